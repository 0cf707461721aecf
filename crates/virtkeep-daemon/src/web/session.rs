//! Browser sessions of the web console: a random id in an HttpOnly cookie stands for
//! the scope of the token that logged in; the token itself is never stored, neither in
//! the cookie nor here. Sessions live in memory: a daemon restart logs everyone out.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::scope::Scope;

/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// At most this many sessions of one token: a login beyond it ends that token's oldest
/// session (never another token's), so that no token can log others out.
pub const MAX_SESSIONS_PER_TOKEN: usize = 32;
/// At most this many sessions at once (a bound on memory whatever the number of
/// tokens): a login beyond it is refused until sessions expire or log out.
pub const MAX_SESSIONS: usize = 4096;

/// What a session may do, and the token its forms must carry.
#[derive(Debug, Clone)]
pub struct Session {
    pub scope: Scope,
    /// The per-session CSRF token, sent back in every form's hidden `csrf` field.
    pub csrf: String,
    /// Which token logged in (its index among the API's tokens).
    token: usize,
    created: Instant,
}

impl Session {
    /// Whether `given` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, given: &str) -> bool {
        !given.is_empty() && bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

/// 32 random bytes from the kernel, hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    let mut buf = [0u8; 32];
    // /dev/urandom never blocks after boot and never fails on a working Linux; a failure
    // here must not yield a guessable token, so it is fatal.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom for a session token");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// A new session of `scope` for the token at `token`: its id (the cookie's value);
    /// `None` when [`MAX_SESSIONS`] are live.
    pub fn create(&self, scope: Scope, token: usize) -> Option<String> {
        self.create_at(scope, token, Instant::now())
    }

    fn create_at(&self, scope: Scope, token: usize, now: Instant) -> Option<String> {
        let id = random_token();
        let mut map = self.map.lock().ok()?;
        map.retain(|_, s| now.duration_since(s.created) < SESSION_TTL);
        loop {
            let mine = map.iter().filter(|(_, s)| s.token == token);
            if mine.clone().count() < MAX_SESSIONS_PER_TOKEN {
                break;
            }
            let oldest = mine.min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        if map.len() >= MAX_SESSIONS {
            return None;
        }
        map.insert(
            id.clone(),
            Session {
                scope,
                csrf: random_token(),
                token,
                created: now,
            },
        );
        Some(id)
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        let map = self.map.lock().ok()?;
        map.get(id)
            .filter(|s| now.duration_since(s.created) < SESSION_TTL)
            .cloned()
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }
}

/// The value of cookie `name` in a `Cookie:` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_are_bounded() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let id = s.create_at(Scope::Operate, 0, t0).expect("room");
        assert_eq!(id.len(), 64);
        let got = s.get_at(&id, t0).expect("live");
        assert_eq!(got.scope, Scope::Operate);
        assert!(got.csrf_ok(&got.csrf.clone()));
        assert!(!got.csrf_ok(""));
        assert!(!got.csrf_ok(&random_token()));
        assert!(s.get_at(&id, t0 + SESSION_TTL).is_none(), "expired");
        assert!(s.get_at("nope", t0).is_none());
        s.remove(&id);
        assert!(s.get_at(&id, t0).is_none(), "logged out");
    }

    #[test]
    fn one_token_cannot_log_out_another() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let victim = s.create_at(Scope::Admin, 0, t0).expect("room");
        let first = s.create_at(Scope::Read, 1, t0).expect("room");
        for i in 0..MAX_SESSIONS_PER_TOKEN + 5 {
            let t = t0 + Duration::from_secs(i as u64 + 1);
            s.create_at(Scope::Read, 1, t).expect("room");
        }
        let map = s.map.lock().expect("lock");
        assert_eq!(
            map.values().filter(|x| x.token == 1).count(),
            MAX_SESSIONS_PER_TOKEN
        );
        drop(map);
        assert!(s.get_at(&victim, t0).is_some(), "token 0's session stays");
        assert!(s.get_at(&first, t0).is_none(), "token 1's oldest went");
    }

    #[test]
    fn the_total_is_bounded_without_evicting_anyone() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let tokens = MAX_SESSIONS / MAX_SESSIONS_PER_TOKEN;
        for token in 0..tokens {
            for _ in 0..MAX_SESSIONS_PER_TOKEN {
                s.create_at(Scope::Read, token, t0).expect("room");
            }
        }
        assert!(s.create_at(Scope::Read, tokens, t0).is_none(), "full");
        assert_eq!(s.map.lock().expect("lock").len(), MAX_SESSIONS);
        let later = t0 + SESSION_TTL;
        assert!(
            s.create_at(Scope::Read, tokens, later).is_some(),
            "expired ones make room"
        );
    }

    #[test]
    fn cookie_header_parsing() {
        let h = "a=1; vk_session=abc ; other=x=y";
        assert_eq!(cookie(h, "vk_session"), Some("abc"));
        assert_eq!(cookie(h, "other"), Some("x=y"));
        assert_eq!(cookie(h, "vk"), None);
    }
}
