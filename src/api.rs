//! The HTTP JSON API every agent serves.
//!
//! It listens on loopback unless told otherwise; on any other address it
//! requires a bearer token (`--http-token`), checked on every request.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal_membership::{Capacity, Load, MembershipView};
use tokio::sync::watch;

/// What the API handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// The node's membership view.
    pub view: watch::Receiver<MembershipView>,
    /// Bearer token required on every request, if set.
    pub token: Option<Arc<str>>,
}

/// One node as `/v1/nodes` and `shoal nodes --json` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// QUIC address.
    pub address: String,
    /// `alive`, `suspect`, `dead` or `left`.
    pub state: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Capacity.
    pub capacity: Capacity,
    /// Current load.
    pub load: Load,
    /// Available drivers.
    pub drivers: Vec<String>,
    /// shoal version.
    pub version: String,
    /// Start-up generation.
    pub generation: u64,
    /// What the node cannot enforce.
    pub notes: Vec<String>,
}

/// Error body of every failed request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

/// The view as the API shows it.
pub fn nodes_of(view: &MembershipView) -> Vec<NodeInfo> {
    view.members
        .iter()
        .map(|m| NodeInfo {
            name: m.record.name.clone(),
            address: m.record.address.to_string(),
            state: m.state.as_str().to_string(),
            labels: m.record.labels.clone(),
            capacity: m.record.capacity,
            load: m.load,
            drivers: m.record.drivers.clone(),
            version: m.record.version.clone(),
            generation: m.generation,
            notes: m.record.notes.clone(),
        })
        .collect()
}

async fn nodes(State(state): State<ApiState>) -> Json<Vec<NodeInfo>> {
    Json(nodes_of(&state.view.borrow()))
}

async fn health(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let name = state.view.borrow().self_name.clone();
    Json(serde_json::json!({ "status": "ok", "name": name }))
}

async fn auth(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token) {
            return error(
                StatusCode::UNAUTHORIZED,
                "this agent requires an API token: set SHOAL_HTTP_TOKEN or pass --http-token",
            );
        }
    }
    next.run(req).await
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; see `shoal --help` for the API the CLI uses",
    )
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/health", get(health))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Checks the listen address against the token rule.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() && token.is_none_or(str::is_empty) {
        anyhow::bail!(
            "--http {addr} is not a loopback address: the API would be open to the network. \
             Pass --http-token TOKEN (or set SHOAL_HTTP_TOKEN) so that it requires a token"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_a_token() {
        assert!(check_exposure("127.0.0.1:1".parse().unwrap(), None).is_ok());
        assert!(check_exposure("0.0.0.0:1".parse().unwrap(), None).is_err());
        assert!(check_exposure("0.0.0.0:1".parse().unwrap(), Some("")).is_err());
        assert!(check_exposure("0.0.0.0:1".parse().unwrap(), Some("t")).is_ok());
    }
}
