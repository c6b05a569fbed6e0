#!/usr/bin/env bash
# Makes the local image `shoal-test/busybox:1` that the docker tests and
# docker-bench use: no registry is reachable, so it is a `docker import` of
# a tarball holding Debian's static busybox (apt-get install busybox-static)
# and links for the tools the jobs call. Does nothing if the image exists.
set -euo pipefail
IMAGE="${1:-shoal-test/busybox:1}"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
if [ ! -x /bin/busybox ]; then
  echo "need /bin/busybox: apt-get install busybox-static" >&2
  exit 1
fi
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/bin"
cp /bin/busybox "$dir/bin/busybox"
for tool in sh sleep echo cat true false; do
  ln -s busybox "$dir/bin/$tool"
done
tar -C "$dir" -cf "$dir/image.tar" bin
docker import "$dir/image.tar" "$IMAGE" >/dev/null
echo "made $IMAGE" >&2
