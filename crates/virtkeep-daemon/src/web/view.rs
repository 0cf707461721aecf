//! What every console page shares: the state, the logged-in viewer, the page layout,
//! error pages and how numbers are shown.

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::repo_stats::RepoStats;
use super::session::{Session, Sessions};
use super::throttle::Throttle;
use crate::api::ApiState;
use crate::scope::{self, Action};

pub struct WebState {
    pub api: Arc<ApiState>,
    pub sessions: Sessions,
    pub throttle: Throttle,
    pub repo_stats: RepoStats,
    /// Live-progress streams open now (at most [`MAX_STREAMS`]).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Cookies get `Secure` (the API serves HTTPS).
    pub secure: bool,
}

/// Server-sent-event streams open at once; more are answered 503 (each polls the
/// catalog once a second).
pub const MAX_STREAMS: usize = 64;

/// Runs `f` (catalog calls: SQLite, or PostgreSQL waited for on a thread) on a blocking
/// thread, off the async runtime.
pub async fn blocking<T: Send + 'static>(
    s: &Arc<WebState>,
    f: impl FnOnce(&WebState) -> T + Send + 'static,
) -> Result<T, Response> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| page_error(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()))
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

impl WebState {
    pub fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
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
                link rel="icon" href="/ui/static/icon.svg" type="image/svg+xml";
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
    fn human_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(age(59), "59 s");
        assert_eq!(age(3600), "60 min");
        assert_eq!(age(3 * 86_400), "3 d");
        assert_eq!(unix("1970-01-01T00:01:00Z"), Some(60));
    }
}
