//! The web console under `/ui/`: server-rendered HTML (maud) over the same catalog,
//! progress map and job submissions as the REST API, with the same token scopes.
//!
//! A browser logs in once with an API token; it gets a session cookie (HttpOnly,
//! SameSite=Strict, Secure when the API serves HTTPS) that stands for the token's scope.
//! Every form carries the session's CSRF token, checked here, and a cross-site `Origin`
//! on any POST is refused before a handler runs. CSS and JS are compiled in; the
//! Content-Security-Policy allows nothing but this origin. docs/daemon.md ("Web console").

mod files;
mod jobs;
mod pages;
mod repo_stats;
mod restore;
mod session;
mod throttle;
mod view;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::html;
use serde::Deserialize;

use crate::api::ApiState;
use session::Sessions;
use view::{Viewer, WebState, layout, page_error};

/// The session cookie's name.
pub const COOKIE: &str = "vk_session";
/// The login form's double-submit cookie (there is no session yet to hold a CSRF token).
const LOGIN_COOKIE: &str = "vk_login";
/// Longest token a login form may send (tokens are compared, not parsed).
const MAX_TOKEN_LEN: usize = 4096;

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/app.js");
const ICON: &str = include_str!("assets/icon.svg");

/// The console's routes, to merge into the API's router (which adds the body limit and
/// request deadline).
pub fn router<S>(api: Arc<ApiState>) -> Router<S> {
    let secure = api.env.daemon.api.as_ref().is_some_and(|a| a.tls.is_some());
    let state = Arc::new(WebState {
        api,
        sessions: Sessions::default(),
        throttle: throttle::Throttle::default(),
        repo_stats: repo_stats::RepoStats::default(),
        streams: Arc::new(tokio::sync::Semaphore::new(view::MAX_STREAMS)),
        secure,
    });
    let private = Router::new()
        .route("/ui/", get(pages::dashboard))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{id}", get(jobs::show))
        .route("/ui/jobs/{id}/events", get(jobs::events))
        .route("/ui/jobs/{id}/cancel", post(jobs::cancel))
        .route("/ui/backup", post(jobs::start_backup))
        .route("/ui/files", get(files::browse))
        .route("/ui/files/download", get(files::download))
        .route("/ui/policies", get(pages::policies))
        .route("/ui/hosts", get(pages::hosts))
        .route("/ui/hosts/{host}", get(pages::host_vms))
        .route("/ui/restore", get(restore::pick).post(restore::run))
        .route("/ui/restore/plan", get(restore::plan))
        .route("/ui/logout", post(logout))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/static/style.css", get(style))
        .route("/ui/static/app.js", get(script))
        .route("/ui/static/icon.svg", get(icon))
        .merge(private)
        .layer(axum::middleware::from_fn(guard))
        .with_state(state)
}

/// Security headers on every answer, and no cross-site POST at all: a browser sends
/// `Origin` with every POST, and one naming another site is refused here, before any
/// handler (the CSRF token is checked as well, in the handlers).
async fn guard(req: Request, next: Next) -> Response {
    if req.method() == Method::POST && !same_origin(req.headers()) {
        return page_error(
            StatusCode::FORBIDDEN,
            "Cross-site request refused",
            "This form was sent from another site.",
        );
    }
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // Not `no-referrer`: under it browsers send `Origin: null` with form posts, which
    // the origin check above would have to let through.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::CACHE_CONTROL, "no-store");
    r
}

/// Whether a POST's `Origin` (if any) names the host it was sent to. `Sec-Fetch-Site:
/// cross-site` is refused too, for browsers that leave `Origin` out.
fn same_origin(h: &HeaderMap) -> bool {
    if h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return false;
    }
    let Some(origin) = h.get(header::ORIGIN) else {
        return true;
    };
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, a)| a);
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

fn cookie_value<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| session::cookie(v, name))
}

/// Lets requests with a live session through (with a [`Viewer`]); sends the others to
/// the login page.
async fn require_session(State(s): State<Arc<WebState>>, mut req: Request, next: Next) -> Response {
    let found = cookie_value(req.headers(), COOKIE)
        .and_then(|id| s.sessions.get(id).map(|session| (id.to_string(), session)));
    match found {
        Some((id, session)) => {
            req.extensions_mut().insert(Viewer { id, session });
            next.run(req).await
        }
        None => Redirect::to("/ui/login").into_response(),
    }
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

/// The tab icon (without one, browsers ask for /favicon.ico and log its 404).
async fn icon() -> Response {
    ([(header::CONTENT_TYPE, "image/svg+xml")], ICON).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

fn login_form(csrf: &str, error: Option<&str>) -> Html<String> {
    layout(
        "Log in",
        None,
        html! {
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.card method="post" action="/ui/login" {
                input type="hidden" name="csrf" value=(csrf);
                label for="token" { "API token" }
                input #token type="password" name="token" required autocomplete="current-password"
                    autofocus maxlength=(MAX_TOKEN_LEN);
                p.hint { "A token from [daemon.api]: its scope (read, operate, admin) decides what you may do here." }
                button type="submit" { "Log in" }
            }
        },
    )
}

async fn login_page(State(s): State<Arc<WebState>>) -> Response {
    let csrf = session::random_token();
    let cookie = s.set_cookie(LOGIN_COOKIE, &csrf, 3600);
    ([(header::SET_COOKIE, cookie)], login_form(&csrf, None)).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

/// The client's address, when the server recorded it (`ConnectInfo`).
fn peer(ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<axum::extract::ConnectInfo<crate::idle::PeerAddr>>()
        .map(|c| c.0.0.ip())
}

/// Checks the token as the API does; a good one gets a session cookie, a wrong one the
/// login page again (401). An address that sent too many wrong tokens gets 429.
async fn login(
    State(s): State<Arc<WebState>>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    use subtle::ConstantTimeEq;
    let expected = cookie_value(&headers, LOGIN_COOKIE).unwrap_or("");
    let fresh = session::random_token();
    let again = |status: StatusCode, msg: &str| {
        let cookie = s.set_cookie(LOGIN_COOKIE, &fresh, 3600);
        (
            status,
            [(header::SET_COOKIE, cookie)],
            login_form(&fresh, Some(msg)),
        )
            .into_response()
    };
    let ip = peer(&ext);
    if let Err(wait) = s.throttle.check(ip, std::time::Instant::now()) {
        let secs = wait.as_secs().max(1);
        let mut r = again(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("Too many wrong tokens from your address. Try again in {secs} s."),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    if f.csrf.is_empty() || !bool::from(f.csrf.as_bytes().ct_eq(expected.as_bytes())) {
        return again(
            StatusCode::FORBIDDEN,
            "The login form expired (or cookies are off). Please try again.",
        );
    }
    let token = f.token.trim();
    let found = (token.len() <= MAX_TOKEN_LEN)
        .then(|| s.api.token_match(token.as_bytes()))
        .flatten();
    let Some((scope, index)) = found else {
        // The attempt reserved by check() stays counted as a failure.
        return again(StatusCode::UNAUTHORIZED, "Wrong token.");
    };
    s.throttle.succeeded(ip);
    let Some(id) = s.sessions.create(scope, index) else {
        return again(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many sessions are open; try again later.",
        );
    };
    let mut r = Redirect::to("/ui/").into_response();
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        s.set_cookie(COOKIE, &id, session::SESSION_TTL.as_secs()),
    );
    h.append(header::SET_COOKIE, s.set_cookie(LOGIN_COOKIE, "", 0));
    r
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = v.bad_csrf(&f.csrf) {
        return r;
    }
    s.sessions.remove(&v.id);
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut()
        .append(header::SET_COOKIE, s.set_cookie(COOKIE, "", 0));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_must_match_the_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h), "no Origin: the CSRF token decides");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }
}
