//! What signing gossip values costs: signing a value, checking one, and
//! checking a peer's certificate (done once per certificate), against
//! decoding the same value's JSON in the same run (what every reader did
//! already).
//!
//! Usage: cargo run -p chaos --release --bin sign-bench -- [--help]

use std::time::Instant;

use clap::Parser;
use shoal_membership::signed::{self, Origin};
use shoal_transport::sign::Signer;
use shoal_transport::tls::ClusterCa;

#[derive(Parser, Debug)]
#[command(about = "Cost of signed gossip values: sign, verify, certificate check, vs JSON decode")]
struct Args {
    /// Operations per measurement.
    #[arg(long, default_value_t = 5_000)]
    ops: u32,
    /// Size of the value signed, bytes (an instance bucket is up to 32 KiB;
    /// most are a few hundred bytes).
    #[arg(long, default_value_t = 512)]
    value_bytes: usize,
}

fn per_op(ops: u32, mut f: impl FnMut(u32)) -> f64 {
    let t = Instant::now();
    for i in 0..ops {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(ops)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca = ClusterCa::generate("bench")?;
    let a = Signer::new(&ca.issue_node("a")?)?;
    let reader = Signer::new(&ca.issue_node("r")?)?;
    let origin = Origin {
        name: "a",
        generation: 1,
        addr: "127.0.0.1:7000".parse()?,
    };
    // A JSON value of about the requested size.
    let items: Vec<serde_json::Value> = (0..args.value_bytes / 64 + 1)
        .map(|i| serde_json::json!({"s": i, "r": 1_853_070_353_016_815_616u64, "t": "running"}))
        .collect();
    let value = serde_json::to_string(&items)?;
    let message = signed::message(origin, "app/i/3/0", 7, Some(&value));
    let sig = a.sign(&message);
    let key = reader
        .check_certificate("a", &a.certificate())
        .map_err(anyhow::Error::msg)?;

    let json_us = per_op(args.ops, |_| {
        let v: serde_json::Value = serde_json::from_str(&value).expect("decodes");
        std::hint::black_box(v);
    });
    let sign_us = per_op(args.ops, |i| {
        std::hint::black_box(a.sign(&signed::message(
            origin,
            "app/i/3/0",
            u64::from(i),
            Some(&value),
        )));
    });
    let verify_us = per_op(args.ops, |_| {
        assert!(key.verify(&signed::message(origin, "app/i/3/0", 7, Some(&value)), &sig));
    });
    let cert = a.certificate();
    let cert_us = per_op(args.ops / 10 + 1, |_| {
        std::hint::black_box(reader.check_certificate("a", &cert).expect("valid"));
    });
    println!(
        "value: {} bytes of JSON; {} ops each",
        value.len(),
        args.ops
    );
    println!("json decode (baseline)   {json_us:8.1} us/op   1.0x");
    println!(
        "sign                     {sign_us:8.1} us/op   {:.1}x",
        sign_us / json_us
    );
    println!(
        "verify                   {verify_us:8.1} us/op   {:.1}x",
        verify_us / json_us
    );
    println!(
        "certificate check        {cert_us:8.1} us/op   {:.1}x",
        cert_us / json_us
    );
    println!(
        "a node of 100 keys read whole by a new peer: {:.1} ms (verify) + {:.2} ms (certificate)",
        verify_us * 100.0 / 1000.0,
        cert_us / 1000.0
    );
    Ok(())
}
