//! The management API's router (axum): one route per endpoint, and around the handlers, in the
//! order a request meets them:
//!
//! 1. the request log (every answer: client, method, path, how it was authorised, status,
//!    error);
//! 2. no such path: `404 route` (but an empty last segment, `/api/v1/queue/`, is `400 path`);
//! 3. path segments (`{peer}`, `{id}`: percent-decoded, bounded, a fixed alphabet) and the
//!    query: `400 path` / `400 query`;
//! 4. the method: `405 method` (with `Allow`; `HEAD` is not `GET` here);
//! 5. admission — authentication as middleware, from the connection's client certificate
//!    ([`ConnInfo`]) and the `Authorization` header: `401 auth`;
//! 6. the request deadline (not for updates, which stream for up to the connection's limit):
//!    `503 timeout`;
//! 7. the handler (`endpoints`).
//!
//! A request refused before its handler has its body drained (bounded), so that a client still
//! sending reads the answer.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::header::{self, HeaderValue};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{self, MethodRouter};
use sealgate_api as api;

use super::auth::Auth;
use super::error::{ApiError, LoggedError};
use super::{Mgmt, REQUEST_TIMEOUT, body, endpoints, printable};

/// Per connection: who is there. The listener inserts it into every request.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// SHA-256 of the client certificate (DER), if one was presented.
    pub certificate: Option<[u8; 32]>,
}

/// The checked, percent-decoded path parameter (`{peer}` or `{id}`), for the handler.
#[derive(Debug, Clone)]
pub(super) struct PathArg(pub String);

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Anyone (health).
    Open,
    /// An admin.
    Admin,
    /// An admin, or anyone while no credential exists (the config push: first contact).
    AdminOrFirstContact,
}

/// The one method an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Put,
    Post,
    Delete,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Put => "PUT",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }

    fn route<H, T>(self, handler: H) -> MethodRouter<Arc<Mgmt>>
    where
        H: Handler<T, Arc<Mgmt>>,
        T: 'static,
    {
        match self {
            Verb::Get => routing::get(handler),
            Verb::Put => routing::put(handler),
            Verb::Post => routing::post(handler),
            Verb::Delete => routing::delete(handler),
        }
    }
}

/// The API: every endpoint of `docs/mgmt-api.md` with its checks, serving `mgmt`.
pub fn router(mgmt: Arc<Mgmt>) -> Router {
    use Admission::{Admin, AdminOrFirstContact, Open};
    use Verb::{Delete, Get, Post, Put};
    let m = &mgmt;
    Router::new()
        .route(api::HEALTH, endpoint(m, Get, Open, endpoints::health))
        .route(api::STATUS, endpoint(m, Get, Admin, endpoints::status))
        .route(
            api::CONFIG,
            endpoint(m, Put, AdminOrFirstContact, endpoints::push_config),
        )
        .route(api::UPDATE, streaming(m, Put, endpoints::push_update))
        .route(api::REBOOT, endpoint(m, Post, Admin, endpoints::reboot))
        .route(api::POWEROFF, endpoint(m, Post, Admin, endpoints::poweroff))
        .route(
            api::PEER_RESET,
            endpoint(m, Post, Admin, endpoints::peer_reset),
        )
        .route(api::QUEUE, endpoint(m, Get, Admin, endpoints::queue_list))
        .route(
            api::QUEUE_RELEASE,
            endpoint(m, Post, Admin, endpoints::queue_release),
        )
        .route(
            api::QUEUE_MESSAGE,
            endpoint(m, Delete, Admin, endpoints::queue_delete),
        )
        .route_layer(middleware::from_fn(check_path_and_query))
        .fallback(not_found)
        .layer(middleware::from_fn(log))
        .with_state(mgmt)
}

/// An endpoint answered within [`REQUEST_TIMEOUT`].
fn endpoint<H, T>(m: &Arc<Mgmt>, verb: Verb, who: Admission, handler: H) -> MethodRouter<Arc<Mgmt>>
where
    H: Handler<T, Arc<Mgmt>>,
    T: 'static,
{
    let r = verb
        .route(handler)
        .route_layer(middleware::from_fn(deadline));
    admitted(m, verb, who, r)
}

/// An admin endpoint without the request deadline (an update streams its body for up to the
/// connection's limit).
fn streaming<H, T>(m: &Arc<Mgmt>, verb: Verb, handler: H) -> MethodRouter<Arc<Mgmt>>
where
    H: Handler<T, Arc<Mgmt>>,
    T: 'static,
{
    admitted(m, verb, Admission::Admin, verb.route(handler))
}

/// `r` behind admission, and every other method (`HEAD` too, for a `GET`) refused before it.
fn admitted(
    m: &Arc<Mgmt>,
    verb: Verb,
    who: Admission,
    r: MethodRouter<Arc<Mgmt>>,
) -> MethodRouter<Arc<Mgmt>> {
    let gate = Gate {
        mgmt: m.clone(),
        who,
    };
    let r = r.route_layer(middleware::from_fn_with_state(gate, admit));
    let other = move |method: Method, uri: Uri, body: Body| wrong_method(verb, method, uri, body);
    let r = if verb == Verb::Get { r.head(other) } else { r };
    r.fallback(other)
}

/// `405`: the endpoint takes another method.
async fn wrong_method(verb: Verb, method: Method, uri: Uri, body: Body) -> Response {
    body::drain(body).await;
    let e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method",
        format!(
            "{} takes {}, not {method}",
            printable(uri.path()),
            verb.name()
        ),
    );
    let mut r = e.into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(verb.name()));
    r
}

/// `404`: no such endpoint.
async fn not_found(uri: Uri, body: Body) -> Response {
    body::drain(body).await;
    empty_last_segment(uri.path())
        .unwrap_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "route",
                format!("no such endpoint: {}", printable(uri.path())),
            )
        })
        .into_response()
}

/// The router matches no empty parameter at the end of a path (`/api/v1/queue/`): that is a
/// bad path segment (`400 path`), as an empty one in the middle is.
fn empty_last_segment(path: &str) -> Option<ApiError> {
    [api::PEER_RESET, api::QUEUE_RELEASE, api::QUEUE_MESSAGE]
        .into_iter()
        .filter(|t| t.ends_with('}') && api::fill(t, "") == path)
        .find_map(|t| path_arg(t, path).err())
}

/// Refuses `req` with `e`, its body drained first.
async fn refuse(req: Request, e: ApiError) -> Response {
    body::drain(req.into_body()).await;
    e.into_response()
}

/// The path's parameters and the query, checked before the method and the credentials; the
/// decoded parameter goes to the handler as a [`PathArg`].
async fn check_path_and_query(mut req: Request, next: Next) -> Response {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    match path_arg(&template, req.uri().path())
        .and_then(|arg| check_query(&template, req.method(), req.uri().query()).map(|()| arg))
    {
        Ok(arg) => {
            if let Some(a) = arg {
                req.extensions_mut().insert(a);
            }
            next.run(req).await
        }
        Err(e) => refuse(req, e).await,
    }
}

/// The parameter of `path` where `template` (the matched route) has `{peer}` or `{id}`.
fn path_arg(template: &str, path: &str) -> Result<Option<PathArg>, ApiError> {
    let mut arg = None;
    for (t, raw) in template.split('/').zip(path.split('/')) {
        match t {
            "{peer}" => arg = Some(PathArg(peer_name(raw)?)),
            "{id}" => arg = Some(PathArg(queue_id(raw)?)),
            _ => {}
        }
    }
    Ok(arg)
}

/// Only the update takes a query (`reboot=1` or `reboot=0`); it is checked before the method.
fn check_query(template: &str, method: &Method, query: Option<&str>) -> Result<(), ApiError> {
    let q = query.unwrap_or("");
    if template == api::UPDATE {
        if !matches!(q, "" | "reboot=0" | api::UPDATE_REBOOT) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "query",
                format!(
                    "unknown query {:?}: only reboot=1 or reboot=0",
                    printable(q)
                ),
            ));
        }
        if method == Method::PUT {
            return Ok(());
        }
    }
    if q.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "query",
            "this endpoint takes no query",
        ))
    }
}

fn peer_name(raw: &str) -> Result<String, ApiError> {
    segment(raw, api::MAX_PEER, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-' | b'_')
    })
}

fn queue_id(raw: &str) -> Result<String, ApiError> {
    segment(raw, api::MAX_QUEUE_ID, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
    })
}

/// A percent-decoded path segment, non-empty, at most `max` bytes, each byte `ok`.
fn segment(raw: &str, max: usize, ok: impl Fn(u8) -> bool) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "path",
            format!("path segment {:?}: {why}", printable(raw)),
        )
    };
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("bad percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    if out.is_empty() || out.len() > max {
        return Err(bad(&format!("must be 1 to {max} bytes")));
    }
    if !out.iter().all(|&b| ok(b)) {
        return Err(bad("contains a character that is not allowed"));
    }
    String::from_utf8(out).map_err(|_| bad("not UTF-8"))
}

/// The admission middleware's state: the API and who may call the endpoint.
#[derive(Debug, Clone)]
struct Gate {
    mgmt: Arc<Mgmt>,
    who: Admission,
}

/// Authentication: the request proceeds only when authorised; how is carried on the answer.
async fn admit(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let auth = match gate.who {
        Admission::Open => Ok(Auth::Anonymous),
        Admission::Admin => gate.mgmt.authenticate(&req, false),
        Admission::AdminOrFirstContact => gate.mgmt.authenticate(&req, true),
    };
    match auth {
        Ok(auth) => {
            let mut r = next.run(req).await;
            r.extensions_mut().insert(auth);
            r
        }
        Err(e) => refuse(req, e).await,
    }
}

/// The whole request within [`REQUEST_TIMEOUT`].
async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

/// One line per request: client, method, path, how it was authorised, status, error. Never a
/// header (so never a token).
async fn log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = printable(req.uri().path());
    let peer = req
        .extensions()
        .get::<ConnInfo>()
        .map(|c| c.peer.to_string())
        .unwrap_or_default();
    let r = next.run(req).await;
    let auth = r.extensions().get::<Auth>().copied();
    let error = r
        .extensions()
        .get::<LoggedError>()
        .map_or("", |e| e.0.as_str());
    tracing::info!(
        peer = %peer,
        %method,
        path = %path,
        auth = auth.map_or("none", Auth::name),
        status = r.status().as_u16(),
        error,
        "management API request"
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::service::Service as _;
    use hyper_util::service::TowerToHyperService;

    /// One request through the router as the listener serves it; (status, JSON body, headers).
    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
    ) -> (u16, serde_json::Value, axum::http::HeaderMap) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let mut req = req.body(Body::from("x")).unwrap();
        req.extensions_mut().insert(ConnInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            certificate: None,
        });
        let svc = TowerToHyperService::new(app.clone());
        let r = svc.call(req).await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v, headers)
    }

    const CONFIG: &str = "[smtp]\nlisten = [\"127.0.0.1:25\"]\n";

    #[tokio::test]
    async fn routes_reach_their_endpoints() {
        let (m, dir) = super::super::testing::mgmt("routes", CONFIG, Some(b"tok"));
        let app = router(m);
        let t = Some("tok");
        // (method, path, status, check — or "" for success)
        let ok = [
            ("GET", "/api/v1/health", 200, ""),
            ("GET", "/api/v1/status", 200, ""),
            ("PUT", "/api/v1/config", 503, "sealed-store"),
            ("PUT", "/api/v1/update", 501, "appliance"),
            ("PUT", "/api/v1/update?reboot=1", 501, "appliance"),
            ("PUT", "/api/v1/update?reboot=0", 501, "appliance"),
            ("POST", "/api/v1/reboot", 501, "appliance"),
            ("POST", "/api/v1/poweroff", 501, "appliance"),
            ("POST", "/api/v1/peers/127.0.0.5/reset", 404, "peer"),
            ("POST", "/api/v1/peers/mx.example.com/reset", 404, "peer"),
            ("GET", "/api/v1/queue", 200, ""),
            ("POST", "/api/v1/queue/0001A-b_c/release", 404, "queue-id"),
            ("DELETE", "/api/v1/queue/0001A", 404, "queue-id"),
        ];
        for (method, path, status, check) in ok {
            let (got, body, _) = call(&app, method, path, t).await;
            assert_eq!(got, status, "{method} {path}: {body}");
            if !check.is_empty() {
                assert_eq!(body["check"], check, "{method} {path}");
            }
        }
        // percent-decoded parameters reach the handler
        let (_, body, _) = call(&app, "POST", "/api/v1/peers/%3A%3A1/reset", t).await;
        assert_eq!(body["error"], "no peer matches ::1");
        let (_, body, _) = call(&app, "DELETE", "/api/v1/queue/a%2Eb", t).await;
        assert!(
            body["error"].as_str().unwrap().starts_with("a.b: "),
            "{body}"
        );
        let (_, body, _) = call(&app, "GET", "/api/v1/health", None).await;
        assert_eq!(
            (&body["board"], &body["serial"]),
            (&"dev".into(), &"DEV-TEST".into())
        );
        let (_, body, _) = call(&app, "GET", "/api/v1/status", t).await;
        assert_eq!(body["mgmt"]["dev_token"], true, "{body}");
        assert_eq!(body["queue"]["messages"], 0, "{body}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn refusals_come_in_order_with_their_check() {
        let (m, dir) = super::super::testing::mgmt("refusals", CONFIG, Some(b"tok"));
        let app = router(m);
        let bad = [
            ("GET", "/", 404, "route"),
            ("GET", "/api/v1/nothing", 404, "route"),
            ("GET", "/api/v2/status", 404, "route"),
            ("GET", "/api/v1/status/", 404, "route"),
            ("POST", "/api/v1/status", 405, "method"),
            ("HEAD", "/api/v1/status", 405, ""),
            ("GET", "/api/v1/config", 405, "method"),
            ("GET", "/api/v1/queue/X", 405, "method"),
            ("PUT", "/api/v1/update?reboot=yes", 400, "query"),
            ("GET", "/api/v1/update?reboot=1", 400, "query"),
            ("GET", "/api/v1/status?x=1", 400, "query"),
            ("POST", "/api/v1/status?x=1", 400, "query"),
            ("POST", "/api/v1/peers/a%2Fb/reset", 400, "path"),
            ("POST", "/api/v1/peers/%zz/reset", 400, "path"),
            ("POST", "/api/v1/peers//reset", 400, "path"),
            ("DELETE", "/api/v1/queue/..%2f..%2fetc", 400, "path"),
            ("DELETE", "/api/v1/queue/a%0Ab", 400, "path"),
            ("DELETE", "/api/v1/queue/%FF", 400, "path"),
            ("DELETE", "/api/v1/queue/", 400, "path"),
            ("POST", "/api/v1/queue//release", 400, "path"),
            ("GET", "/api/v1/queue/..%2f..%2fetc", 400, "path"),
        ];
        // the credentials are checked last: without them, the same answers
        for token in [Some("tok"), None] {
            for (method, path, status, check) in bad {
                let (got, body, _) = call(&app, method, path, token).await;
                assert_eq!(got, status, "{method} {path}: {body}");
                if !check.is_empty() {
                    assert_eq!(body["check"], check, "{method} {path}: {body}");
                }
            }
        }
        let long = format!("/api/v1/queue/{}", "a".repeat(65));
        let (got, body, _) = call(&app, "DELETE", &long, Some("tok")).await;
        assert_eq!((got, &body["check"]), (400, &"path".into()));
        let (_, body, headers) = call(&app, "DELETE", "/api/v1/status", Some("tok")).await;
        assert_eq!(body["error"], "/api/v1/status takes GET, not DELETE");
        assert_eq!(headers[header::ALLOW], "GET");
        let (_, body, _) = call(&app, "GET", "/api/v1/nothing", None).await;
        assert_eq!(body["error"], "no such endpoint: /api/v1/nothing");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn admission_is_enforced_per_endpoint() {
        let (m, dir) = super::super::testing::mgmt("admission", CONFIG, Some(b"tok"));
        let app = router(m);
        for (method, path) in [
            ("GET", "/api/v1/status"),
            ("PUT", "/api/v1/config"),
            ("PUT", "/api/v1/update"),
            ("POST", "/api/v1/reboot"),
            ("POST", "/api/v1/poweroff"),
            ("POST", "/api/v1/peers/x/reset"),
            ("GET", "/api/v1/queue"),
            ("POST", "/api/v1/queue/X/release"),
            ("DELETE", "/api/v1/queue/X"),
        ] {
            for token in [None, Some("wrong")] {
                let (got, body, headers) = call(&app, method, path, token).await;
                assert_eq!((got, &body["check"]), (401, &"auth".into()), "{path}");
                assert_eq!(
                    headers[header::WWW_AUTHENTICATE],
                    "Bearer realm=\"sealgate\""
                );
            }
        }
        let (got, _, _) = call(&app, "GET", "/api/v1/health", None).await;
        assert_eq!(got, 200);
        std::fs::remove_dir_all(dir).unwrap();

        // nothing configured and no dev token: first contact, a config push only
        let (m, dir) = super::super::testing::mgmt("first", CONFIG, None);
        let app = router(m);
        let (got, body, _) = call(&app, "PUT", "/api/v1/config", None).await;
        assert_eq!((got, &body["check"]), (503, &"sealed-store".into()));
        let (got, body, _) = call(&app, "GET", "/api/v1/status", None).await;
        assert_eq!(got, 401);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("only PUT /api/v1/config")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
