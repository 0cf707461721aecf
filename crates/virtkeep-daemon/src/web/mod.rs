//! The web console under `/ui/`: server-rendered HTML (maud) over the same catalog,
//! progress map and job submissions as the REST API, with the same token scopes.
//!
//! A browser logs in once with an API token; it gets a session cookie (HttpOnly,
//! SameSite=Strict, Secure when the API serves HTTPS) that stands for the token's scope.
//! Every form carries the session's CSRF token, checked here, and a cross-site `Origin`
//! on any POST is refused before a handler runs. CSS and JS are compiled in; the
//! Content-Security-Policy allows nothing but this origin. docs/daemon.md ("Web console").

mod jobs;
mod pages;
mod restore;
mod session;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use crate::api::ApiState;
use crate::scope::{self, Action, Scope};
pub use session::{Session, Sessions};

/// The session cookie's name.
pub const COOKIE: &str = "vk_session";
/// The login form's double-submit cookie (there is no session yet to hold a CSRF token).
const LOGIN_COOKIE: &str = "vk_login";
/// Longest token a login form may send (tokens are compared, not parsed).
const MAX_TOKEN_LEN: usize = 4096;

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/app.js");

pub struct WebState {
    pub api: Arc<ApiState>,
    pub sessions: Sessions,
    /// Cookies get `Secure` (the API serves HTTPS).
    secure: bool,
}

/// The logged-in browser: its session id and what it may do.
#[derive(Clone)]
pub struct Viewer {
    pub id: String,
    pub session: Session,
}

impl Viewer {
    pub fn may(&self, action: Action) -> bool {
        self.session.scope.allows(action.needs())
    }

    /// The 403 page, unless this viewer may do `action`.
    pub fn refuse(&self, action: Action) -> Option<Response> {
        scope::check(self.session.scope, action)
            .err()
            .map(|msg| page_error(StatusCode::FORBIDDEN, "Not allowed", &msg))
    }

    /// The 403 page, unless `given` is this session's CSRF token.
    pub fn bad_csrf(&self, given: &str) -> Option<Response> {
        if self.session.csrf_ok(given) {
            None
        } else {
            Some(page_error(
                StatusCode::FORBIDDEN,
                "Form expired",
                "The form did not carry this session's security token. Reload the page and try again.",
            ))
        }
    }

    /// The hidden CSRF field of a form.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.session.csrf); }
    }
}

/// The console's routes, to merge into the API's router (which adds the body limit and
/// request deadline).
pub fn router<S>(api: Arc<ApiState>) -> Router<S> {
    let secure = api.env.daemon.api.as_ref().is_some_and(|a| a.tls.is_some());
    let state = Arc::new(WebState {
        api,
        sessions: Sessions::default(),
        secure,
    });
    let private = Router::new()
        .route("/ui/", get(pages::dashboard))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{id}", get(jobs::show))
        .route("/ui/jobs/{id}/events", get(jobs::events))
        .route("/ui/jobs/{id}/cancel", post(jobs::cancel))
        .route("/ui/backup", post(jobs::start_backup))
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
    set(h, header::REFERRER_POLICY, "no-referrer");
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

impl WebState {
    fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let text = format!(
            "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        );
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""))
    }
}

/// A whole page: header with navigation, the content, the script.
pub fn layout(title: &str, viewer: Option<&Viewer>, content: Markup) -> Html<String> {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — virtkeep" }
                link rel="stylesheet" href="/ui/static/style.css";
                script src="/ui/static/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "virtkeep" }
                    @if let Some(v) = viewer {
                        nav aria-label="Main" {
                            a href="/ui/" { "Dashboard" }
                            a href="/ui/jobs" { "Jobs" }
                            a href="/ui/policies" { "Policies" }
                            a href="/ui/hosts" { "Hosts" }
                            @if v.may(Action::SubmitRestore) {
                                a href="/ui/restore" { "Restore" }
                            }
                        }
                        form.logout method="post" action="/ui/logout" {
                            (v.csrf_field())
                            span.scope { "scope: " (v.session.scope.as_str()) }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (content)
                }
            }
        }
    };
    Html(page.into_string())
}

/// An error page with `status`.
pub fn page_error(status: StatusCode, title: &str, msg: &str) -> Response {
    let body = layout(
        title,
        None,
        html! {
            p.error role="alert" { (msg) }
            p { a href="/ui/" { "Back to the dashboard" } }
        },
    );
    (status, body).into_response()
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
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

/// Checks the token as the API does; a good one gets a session cookie, a wrong one the
/// login page again (401).
async fn login(
    State(s): State<Arc<WebState>>,
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
    if f.csrf.is_empty() || !bool::from(f.csrf.as_bytes().ct_eq(expected.as_bytes())) {
        return again(
            StatusCode::FORBIDDEN,
            "The login form expired (or cookies are off). Please try again.",
        );
    }
    let token = f.token.trim();
    let scope: Option<Scope> = (token.len() <= MAX_TOKEN_LEN)
        .then(|| s.api.token_scope(token.as_bytes()))
        .flatten();
    let Some(scope) = scope else {
        return again(StatusCode::UNAUTHORIZED, "Wrong token.");
    };
    let id = s.sessions.create(scope);
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

/// `n` bytes in binary units, as people read them.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A duration in seconds as "3 d", "5 h", "12 min", "40 s".
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// Seconds since the epoch of an RFC 3339 time from the catalog.
pub fn unix(rfc3339: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()
        .map(|d| d.timestamp())
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

    #[test]
    fn human_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(age(59), "59 s");
        assert_eq!(age(3600), "60 min");
        assert_eq!(age(3 * 86_400), "3 d");
        assert_eq!(unix("1970-01-01T00:01:00Z"), Some(60));
    }
}
