//! S3 Object Lock: the few requests `object_store` cannot send (a bucket created with
//! Object Lock, per-object retention on PUT, `PutObjectRetention`, deletes of one
//! version), as SigV4-signed raw requests through `object_store`'s own HTTP client and
//! signer, and [`LockedS3Backend`], the S3 backend of a repository made with
//! `repo init --object-lock`. docs/format.md ("Object Lock") describes the protocol.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ChunkBackend, ObjectInfo, ObjectLock, PutOutcome, S3Backend};
use crate::error::{RepoError, Result};

/// Deadline of one raw request, its retries included (a chunk PUT of at most 16 MiB).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest response body read (bucket lock configuration, error documents).
const MAX_BODY: usize = 1 << 20;
/// Retries of an idempotent request after a transient failure (5xx, 503 SlowDown, a
/// connection reset), with exponential backoff from [`RETRY_BASE`].
const MAX_RETRIES: u32 = 4;
const RETRY_BASE: Duration = Duration::from_millis(250);
/// Largest accepted difference between the storage's clock (`Date`) and ours: S3 itself
/// refuses requests signed 15 min off, so more means a broken clock or server, and
/// retention dates computed from it would be wrong (or out of range).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// The repository config's key (`repo::CONFIG_KEY`; the backend does not import `repo`).
const CONFIG: &str = "config";
/// The config is retained this much longer than the data: its extension comes before
/// the manifest a backup publishes (within the lease's 15 min), and it must outlive
/// every object it holds the keys of.
const CONFIG_MARGIN: Duration = Duration::from_secs(3600);

/// Where and as whom raw requests go.
#[derive(Debug)]
pub(crate) struct RawS3 {
    /// `http(s)://host[:port]`, no trailing `/`; buckets are addressed path-style.
    pub base: String,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub allow_http: bool,
    /// Static keys; Object Lock requests need them.
    pub credential: Option<AwsCredential>,
    client: OnceLock<HttpClient>,
    /// Storage clock minus ours (ms), from the last response's `Date`.
    clock_offset_ms: AtomicI64,
    /// The latest [`RawS3::now`] returned (ms since the epoch): it never goes back, so
    /// one process never asks for an earlier retain-until than it asked before.
    last_now_ms: AtomicI64,
}

/// What a HEAD of one object says about its lock.
#[derive(Debug, Clone)]
pub(crate) struct LockHead {
    pub info: ObjectInfo,
    pub retain_until: Option<SystemTime>,
    pub version: Option<String>,
}

/// The bucket's Object Lock state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BucketLock {
    Missing,
    NotEnabled,
    Enabled,
}

/// What a delete of one version did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Deleted {
    /// Deleted, or there was nothing to delete.
    Done,
    /// Refused by the storage (403 AccessDenied: retention or a legal hold).
    Refused(String),
}

/// May a request be sent again when its outcome is unknown?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Sending it twice has the effect of sending it once.
    Idempotent,
    /// A second try could report another outcome (a create-only PUT would see its own
    /// first try as "exists").
    Never,
}

struct Response {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

/// Why one attempt failed: `Transient` ones may be retried.
enum Failure {
    Transient(RepoError),
    Fatal(RepoError),
}

impl RawS3 {
    pub fn new(base: String, bucket: &str, prefix: &str, region: String) -> Self {
        RawS3 {
            base: base.trim_end_matches('/').to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region,
            allow_http: false,
            credential: None,
            client: OnceLock::new(),
            clock_offset_ms: AtomicI64::new(0),
            last_now_ms: AtomicI64::new(0),
        }
    }

    fn client(&self) -> Result<&HttpClient> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        let opts = object_store::ClientOptions::new()
            .with_allow_http(self.allow_http)
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(REQUEST_TIMEOUT);
        let c = ReqwestConnector::default()
            .connect(&opts)
            .map_err(|e| RepoError::backend(self.bucket.clone(), e))?;
        Ok(self.client.get_or_init(|| c))
    }

    /// The storage's current time (our clock corrected by the last `Date` seen), never
    /// earlier than a time this returned before (`Date` has whole seconds: the offset
    /// moves by up to 1 s between responses).
    pub fn now(&self) -> SystemTime {
        let off = self.clock_offset_ms.load(Ordering::Relaxed);
        let ours = ms_diff(SystemTime::now(), SystemTime::UNIX_EPOCH);
        let t = ours.saturating_add(off);
        let t = self.last_now_ms.fetch_max(t, Ordering::Relaxed).max(t);
        SystemTime::UNIX_EPOCH + Duration::from_millis(t.max(0).unsigned_abs())
    }

    /// Record the storage's clock from a response's `Date`; a clock further than
    /// [`MAX_CLOCK_SKEW`] from ours is an error (and is not recorded).
    fn note_date(&self, what: &str, h: &http::HeaderMap) -> Result<()> {
        let Some(d) = header_time(h, "date", true) else {
            return Ok(());
        };
        let off = ms_diff(d, SystemTime::now());
        if off.unsigned_abs() > MAX_CLOCK_SKEW.as_millis() as u64 {
            return Err(RepoError::backend(
                what.to_string(),
                format!(
                    "the storage's clock (Date: {}) is {} s away from this host's (more \
                     than {} s): Object Lock retention dates depend on it; fix the clock \
                     of this host or of the storage (NTP)",
                    h.get("date")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default(),
                    off / 1000,
                    MAX_CLOCK_SKEW.as_secs()
                ),
            ));
        }
        self.clock_offset_ms.store(off, Ordering::Relaxed);
        Ok(())
    }

    /// The retain-until date for a retention of `retain` from storage now, rounded up
    /// to the whole second S3 keeps (so it is never below what was asked).
    fn until(&self, retain: Duration) -> SystemTime {
        ceil_second(self.now() + retain)
    }

    fn url(&self, key: Option<&str>, query: &str) -> String {
        let mut u = format!("{}/{}", self.base, encode(&self.bucket));
        if let Some(k) = key {
            u.push('/');
            if !self.prefix.is_empty() {
                u.push_str(&encode(&self.prefix));
                u.push('/');
            }
            u.push_str(&encode(k));
        }
        if !query.is_empty() {
            u.push('?');
            u.push_str(query);
        }
        u
    }

    /// One signed request, retried (`Retry::Idempotent`) after transient failures with
    /// backoff, all within [`REQUEST_TIMEOUT`]; the body is read (bounded) whatever the
    /// status.
    async fn send(
        &self,
        method: http::Method,
        url: String,
        headers: &[(&'static str, String)],
        body: Bytes,
        retry: Retry,
    ) -> Result<Response> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let once = self.send_once(method.clone(), &url, headers, body.clone());
            let res = match tokio::time::timeout(left, once).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Fatal(RepoError::backend(
                    url.clone(),
                    "request timed out",
                ))),
            };
            let (res, transient) = match res {
                Ok(r) => {
                    let t = transient_status(r.status);
                    (Ok(r), t)
                }
                Err(Failure::Transient(e)) => (Err(e), true),
                Err(Failure::Fatal(e)) => (Err(e), false),
            };
            let wait = backoff(attempt, Instant::now(), deadline);
            match wait {
                Some(w) if transient && retry == Retry::Idempotent => {
                    tokio::time::sleep(w).await;
                    attempt += 1;
                }
                _ => return res,
            }
        }
    }

    async fn send_once(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> std::result::Result<Response, Failure> {
        let cred = self.credential.as_ref().ok_or_else(|| {
            Failure::Fatal(RepoError::InvalidArgument(
                "S3 Object Lock requests need static keys (AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or s3_access_key/s3_secret_key)"
                    .into(),
            ))
        })?;
        let fatal = |e: &dyn std::fmt::Display| Failure::Fatal(RepoError::backend(url, e));
        let mut b = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let mut req = b.body(HttpRequestBody::from(body)).map_err(|e| fatal(&e))?;
        AwsAuthorizer::new(cred, "s3", &self.region)
            .try_authorize(&mut req, Some(digest.as_ref()))
            .map_err(|e| fatal(&e))?;
        let client = self.client().map_err(Failure::Fatal)?;
        // A request that got no (whole) answer — connection refused or reset, a body
        // cut short — is transient.
        let transient = |e: &dyn std::fmt::Display| Failure::Transient(RepoError::backend(url, e));
        let resp = client.execute(req).await.map_err(|e| transient(&e))?;
        let (parts, body) = resp.into_parts();
        let body = read_bounded(body.bytes_stream(), MAX_BODY)
            .await
            .map_err(|e| transient(&e))?;
        self.note_date(url, &parts.headers)
            .map_err(Failure::Fatal)?;
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    fn fail(&self, what: &str, r: &Response) -> RepoError {
        let body = String::from_utf8_lossy(&r.body);
        let code = xml_value(&body, "Code").unwrap_or_default();
        RepoError::backend(
            what.to_string(),
            format!("HTTP {} {code}", r.status).trim_end().to_string(),
        )
    }

    /// Is Object Lock enabled on the bucket (and does the bucket exist)?
    pub async fn bucket_lock(&self) -> Result<BucketLock> {
        let r = self
            .send(
                http::Method::GET,
                self.url(None, "object-lock="),
                &[],
                Bytes::new(),
                Retry::Idempotent,
            )
            .await?;
        let body = String::from_utf8_lossy(&r.body);
        let code = xml_value(&body, "Code").unwrap_or_default();
        match r.status {
            200 if xml_value(&body, "ObjectLockEnabled").as_deref() == Some("Enabled") => {
                Ok(BucketLock::Enabled)
            }
            200 => Ok(BucketLock::NotEnabled),
            404 if code == "NoSuchBucket" => Ok(BucketLock::Missing),
            404 => Ok(BucketLock::NotEnabled),
            _ => Err(self.fail(&self.bucket, &r)),
        }
    }

    /// Create the bucket with Object Lock enabled (which also turns on versioning), in
    /// the configured region.
    pub async fn create_locked_bucket(&self) -> Result<()> {
        let headers = [("x-amz-bucket-object-lock-enabled", "true".to_string())];
        let r = self
            .send(
                http::Method::PUT,
                self.url(None, ""),
                &headers,
                create_bucket_body(&self.region),
                Retry::Never,
            )
            .await?;
        match r.status {
            200 => Ok(()),
            _ => Err(self.fail(&self.bucket, &r)),
        }
    }

    /// PUT with retention `lock.mode` until `until`; `create_only`: not over an
    /// existing object ([`PutOutcome::Existed`]). A create-only PUT is retried only
    /// for a chunk (same key, same bytes: "exists" after a retry is the truth).
    pub async fn put_locked(
        &self,
        key: &str,
        data: Bytes,
        lock: &ObjectLock,
        until: SystemTime,
        create_only: bool,
    ) -> Result<PutOutcome> {
        let mut headers = lock_headers(lock, until, &data);
        if create_only {
            headers.push(("if-none-match", "*".into()));
        }
        let retry = if create_only && !key.starts_with("chunks/") {
            Retry::Never
        } else {
            Retry::Idempotent
        };
        let r = self
            .send(
                http::Method::PUT,
                self.url(Some(key), ""),
                &headers,
                data,
                retry,
            )
            .await?;
        match r.status {
            200 => Ok(PutOutcome::Created),
            412 if create_only => Ok(PutOutcome::Existed),
            _ => Err(self.fail(key, &r)),
        }
    }

    /// Extend the current version's retention to `until` (`PutObjectRetention`);
    /// `false` when the object is gone. A refusal (403: S3 does not shorten a
    /// retention) of an object already retained until `until` or later is success.
    pub async fn extend(&self, key: &str, lock: &ObjectLock, until: SystemTime) -> Result<bool> {
        let body = Bytes::from(format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode>\
             <RetainUntilDate>{}</RetainUntilDate></Retention>",
            lock.mode.as_s3(),
            fmt_time(until)
        ));
        let headers = [("content-md5", content_md5(&body))];
        let r = self
            .send(
                http::Method::PUT,
                self.url(Some(key), "retention="),
                &headers,
                body,
                Retry::Idempotent,
            )
            .await?;
        match r.status {
            200 | 204 => Ok(true),
            404 => Ok(false),
            403 => match self.head(key).await? {
                None => Ok(false),
                Some(h) if retained_until(h.retain_until, until) => Ok(true),
                Some(_) => Err(self.fail(key, &r)),
            },
            _ => Err(self.fail(key, &r)),
        }
    }

    /// HEAD: size, times, retention and version of the current version.
    pub async fn head(&self, key: &str) -> Result<Option<LockHead>> {
        let r = self
            .send(
                http::Method::HEAD,
                self.url(Some(key), ""),
                &[],
                Bytes::new(),
                Retry::Idempotent,
            )
            .await?;
        match r.status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.fail(key, &r)),
        }
        let h = &r.headers;
        let size = h
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Some(LockHead {
            info: ObjectInfo {
                key: key.to_string(),
                size,
                modified: header_time(h, "last-modified", true).unwrap_or(SystemTime::UNIX_EPOCH),
            },
            retain_until: header_time(h, "x-amz-object-lock-retain-until-date", false),
            version: h
                .get("x-amz-version-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && *v != "null")
                .map(str::to_string),
        }))
    }

    /// Delete one version for good (`None`: the current one, leaving a delete marker);
    /// `bypass`: with `x-amz-bypass-governance-retention` (administrators' cleanup).
    pub async fn delete_version(
        &self,
        key: &str,
        version: Option<&str>,
        bypass: bool,
    ) -> Result<Deleted> {
        let query = version
            .map(|v| format!("versionId={}", encode(v)))
            .unwrap_or_default();
        let headers: &[(&'static str, String)] = if bypass {
            &[("x-amz-bypass-governance-retention", "true".to_string())]
        } else {
            &[]
        };
        let r = self
            .send(
                http::Method::DELETE,
                self.url(Some(key), &query),
                headers,
                Bytes::new(),
                Retry::Idempotent,
            )
            .await?;
        let body = String::from_utf8_lossy(&r.body);
        let code = xml_value(&body, "Code").unwrap_or_default();
        match delete_outcome(r.status, &code) {
            Some(d) => Ok(d),
            None => Err(self.fail(key, &r)),
        }
    }
}

/// A DELETE's status: done (gone, or nothing there), refused (403 AccessDenied: retention,
/// a legal hold, or a missing permission), or `None`: an error. Other 403s (a bad
/// signature, a skewed clock, an expired token) are real errors: counting them as
/// retained would hide a misconfiguration behind GC statistics.
fn delete_outcome(status: u16, code: &str) -> Option<Deleted> {
    match (status, code) {
        (200 | 204 | 404, _) => Some(Deleted::Done),
        (403, "AccessDenied") => Some(Deleted::Refused(format!("HTTP 403 {code}"))),
        _ => None,
    }
}

/// Worth another try: the server failed or asked us to slow down (503 SlowDown).
fn transient_status(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504)
}

/// The pause before retry `attempt` + 1 (exponential from [`RETRY_BASE`], a little
/// jitter), or `None` when the retries are used up or it would end after `deadline`.
fn backoff(attempt: u32, now: Instant, deadline: Instant) -> Option<Duration> {
    if attempt >= MAX_RETRIES {
        return None;
    }
    let base = RETRY_BASE * 2u32.pow(attempt);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let wait = base + base / 4 * (nanos % 1000) / 1000;
    (now + wait < deadline).then_some(wait)
}

/// At most `max` bytes of a body; the rest is not read (the connection is dropped).
async fn read_bounded<S, E>(mut body: S, max: usize) -> std::result::Result<Bytes, E>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
{
    let mut out = Vec::new();
    while let Some(part) = body.next().await {
        let part = part?;
        let room = max - out.len();
        out.extend_from_slice(&part[..part.len().min(room)]);
        if out.len() >= max {
            break;
        }
    }
    Ok(Bytes::from(out))
}

/// `CreateBucketConfiguration` naming the region: S3 requires it outside us-east-1
/// (where it must be absent); RGW checks it against its zonegroup.
fn create_bucket_body(region: &str) -> Bytes {
    if region.is_empty() || region == "us-east-1" {
        return Bytes::new();
    }
    Bytes::from(format!(
        "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
         <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
        xml_escape(region)
    ))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Is an object retained until `wanted` or later?
fn retained_until(until: Option<SystemTime>, wanted: SystemTime) -> bool {
    until.is_some_and(|u| u >= wanted)
}

fn ceil_second(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => {
            SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1)
        }
        _ => t,
    }
}

fn lock_headers(lock: &ObjectLock, until: SystemTime, data: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("x-amz-object-lock-mode", lock.mode.as_s3().to_string()),
        ("x-amz-object-lock-retain-until-date", fmt_time(until)),
        ("content-md5", content_md5(data)),
    ]
}

/// Object Lock requests must carry a Content-MD5 (S3 refuses them otherwise).
fn content_md5(data: &[u8]) -> String {
    use md5::Digest;
    data_encoding::BASE64.encode(&md5::Md5::digest(data))
}

/// Percent-encoding of a key or bucket for the URL path (`/` kept), as SigV4 expects.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RFC 3339, whole seconds. Times `time` cannot represent (beyond year 9999) come out
/// as the epoch rather than panicking; the clock bound keeps them from being asked.
fn fmt_time(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&Rfc3339).unwrap_or_default()
}

/// A time header: HTTP date (`http_date`) or RFC 3339 (Object Lock dates).
fn header_time(h: &http::HeaderMap, name: &str, http_date: bool) -> Option<SystemTime> {
    let v = h.get(name)?.to_str().ok()?;
    let t = if http_date {
        let fmt = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        time::PrimitiveDateTime::parse(v, &fmt).ok()?.assume_utc()
    } else {
        OffsetDateTime::parse(v, &Rfc3339).ok()?
    };
    Some(t.into())
}

fn ms_diff(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |v| -v),
    }
}

/// The text of the first `<tag>…</tag>` (S3's XML answers are flat enough for this).
fn xml_value(doc: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = doc.find(&open)? + open.len();
    let len = doc[start..].find(&format!("</{tag}>"))?;
    Some(doc[start..start + len].trim().to_string())
}

/// Chunks, indexes, manifests and the config (which holds the keys of the rest) get
/// retention; leases and `protected` markers stay deletable and rewritable.
fn retained(key: &str) -> bool {
    if key.starts_with("chunks/") || key == CONFIG {
        return true;
    }
    let mut parts = key.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("snapshots"), Some(_), Some(leaf), None) if leaf == "manifest" || leaf.ends_with(".fidx")
    )
}

/// The S3 backend of an Object Lock repository: retained objects are written with
/// retention, "re-written" (a chunk a backup reuses) by extending it, report their
/// lock time as their modification time, and are deleted — one version, for good —
/// only once out of retention ([`RepoError::Retained`] before).
#[derive(Debug)]
pub struct LockedS3Backend {
    inner: Arc<S3Backend>,
    lock: ObjectLock,
}

impl LockedS3Backend {
    pub(crate) fn new(inner: Arc<S3Backend>, lock: ObjectLock) -> Self {
        LockedS3Backend { inner, lock }
    }

    /// How long `key` is retained from a write or an extension: the config
    /// [`CONFIG_MARGIN`] longer than the data.
    fn retain(&self, key: &str) -> Duration {
        if key == CONFIG {
            self.lock.retain + CONFIG_MARGIN
        } else {
            self.lock.retain
        }
    }

    /// A retained object's modification time for the GC and reuse rules: when its
    /// retention was last set (extended), not when its bytes were written.
    fn lock_time(&self, h: &LockHead) -> SystemTime {
        h.retain_until
            .and_then(|u| u.checked_sub(self.retain(&h.info.key)))
            .map_or(h.info.modified, |t| t.max(h.info.modified))
    }

    async fn put_locked(&self, key: &str, data: Bytes, create_only: bool) -> Result<PutOutcome> {
        let raw = &self.inner.raw;
        let until = raw.until(self.retain(key));
        raw.put_locked(key, data, &self.lock, until, create_only)
            .await
    }
}

#[async_trait]
impl ChunkBackend for LockedS3Backend {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        if !retained(key) {
            return self.inner.put_if_absent(key, data).await;
        }
        self.put_locked(key, data, true).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        if !retained(key) {
            return self.inner.put(key, data).await;
        }
        // A chunk is content-addressed: the same bytes are there, only their retention
        // needs to move (a re-upload would leave one more locked version behind).
        if key.starts_with("chunks/") && self.extend_retention(key).await? {
            return Ok(());
        }
        self.put_locked(key, data, false).await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.inner.get(key).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        if !retained(key) {
            return self.inner.head(key).await;
        }
        Ok(self.inner.raw.head(key).await?.map(|h| ObjectInfo {
            modified: self.lock_time(&h),
            ..h.info
        }))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        self.inner.list(prefix)
    }

    fn list_temp<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        self.inner.list_temp(prefix)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        if !retained(key) {
            return self.inner.delete(key).await;
        }
        let raw = &self.inner.raw;
        let Some(h) = raw.head(key).await? else {
            return Ok(());
        };
        if let Some(until) = h.retain_until.filter(|u| *u > raw.now()) {
            return Err(RepoError::Retained {
                key: key.to_string(),
                until: fmt_time(until),
            });
        }
        match raw.delete_version(key, h.version.as_deref(), false).await? {
            Deleted::Done => Ok(()),
            // Retention extended since the HEAD (a backup reusing the chunk), a legal
            // hold, or no s3:DeleteObjectVersion: kept, like a retained object.
            Deleted::Refused(why) => Err(RepoError::Retained {
                key: key.to_string(),
                until: format!("an unknown date (the storage refused the delete: {why})"),
            }),
        }
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn extend_retention(&self, key: &str) -> Result<bool> {
        if !retained(key) {
            return Ok(true);
        }
        let raw = &self.inner.raw;
        let until = raw.until(self.retain(key));
        raw.extend(key, &self.lock, until).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_keys() {
        assert!(retained("chunks/ab/abcd"));
        assert!(retained("snapshots/x/manifest"));
        assert!(retained("snapshots/x/vda.fidx"));
        assert!(!retained("snapshots/x/protected"));
        assert!(!retained("locks/backup-1"));
        assert!(retained("config"), "holds the keys of everything else");
        assert!(!retained("snapshots/x/y/manifest"));
    }

    #[test]
    fn encodes_and_parses() {
        assert_eq!(encode("a b/c+d"), "a%20b/c%2Bd");
        assert_eq!(
            xml_value("<a><Code>AccessDenied</Code></a>", "Code").as_deref(),
            Some("AccessDenied")
        );
        let mut h = http::HeaderMap::new();
        h.insert(
            "date",
            http::HeaderValue::from_static("Sun, 06 Dec 2026 17:16:31 GMT"),
        );
        h.insert(
            "x-amz-object-lock-retain-until-date",
            http::HeaderValue::from_static("2026-12-07T17:16:31.000Z"),
        );
        let d = header_time(&h, "date", true).expect("date");
        let u = header_time(&h, "x-amz-object-lock-retain-until-date", false).expect("until");
        assert_eq!(u.duration_since(d).ok(), Some(Duration::from_secs(86400)));
        assert_eq!(fmt_time(u), "2026-12-07T17:16:31Z");
    }

    /// A server `Date` of year 9999 is refused with a clear error instead of being
    /// used (it made `now + retain` unrepresentable: a panic), and `now` stays ours.
    #[test]
    fn absurd_server_clock_is_refused() {
        let raw = RawS3::new("http://x".into(), "b", "", "us-east-1".into());
        let mut h = http::HeaderMap::new();
        h.insert(
            "date",
            http::HeaderValue::from_static("Fri, 31 Dec 9999 23:59:59 GMT"),
        );
        let e = raw.note_date("k", &h).expect_err("accepted");
        assert!(e.to_string().contains("clock"), "{e}");
        let skew = ms_diff(raw.now(), SystemTime::now()).abs();
        assert!(skew < 60_000, "offset taken anyway: {skew} ms");
        assert!(!fmt_time(raw.until(Duration::from_secs(86400))).is_empty());
        // Out of `time`'s range: no panic.
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(fmt_time(far), "1970-01-01T00:00:00Z");
        let past = ms_diff(
            SystemTime::now() - Duration::from_secs(1200),
            SystemTime::now(),
        );
        assert!((-1_201_000..=-1_199_000).contains(&past), "{past}");
    }

    /// Retain-until dates never go back: the `Date` offset has whole seconds and may
    /// drop by up to 1 s between responses, which made an extension ask for ~1 s less
    /// than the object already had (RGW: 403, a failed backup). `now` is monotonic and
    /// the date rounds up; `retained_until` accepts an object already retained longer.
    #[test]
    fn retain_until_never_goes_back() {
        let raw = RawS3::new("http://x".into(), "b", "", "us-east-1".into());
        let date = |off: Duration| {
            let t = OffsetDateTime::from(SystemTime::now() + off);
            let fmt = time::macros::format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            );
            let mut h = http::HeaderMap::new();
            h.insert(
                "date",
                http::HeaderValue::from_str(&t.format(&fmt).expect("format")).expect("header"),
            );
            h
        };
        let retain = Duration::from_secs(3600);
        raw.note_date("k", &date(Duration::from_secs(30)))
            .expect("30 s");
        let first = raw.until(retain);
        raw.note_date("k", &date(Duration::from_secs(28)))
            .expect("28 s");
        let second = raw.until(retain);
        assert!(second >= first, "{first:?} then {second:?}");
        assert_eq!(fmt_time(first).len(), "2026-12-07T17:16:31Z".len());
        let exact = ceil_second(first);
        assert_eq!(exact, first, "not rounded to a whole second");
        let half = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(
            ceil_second(half),
            SystemTime::UNIX_EPOCH + Duration::from_secs(2)
        );
        assert!(retained_until(Some(second), first));
        assert!(!retained_until(Some(first - Duration::from_secs(1)), first));
        assert!(!retained_until(None, first));
    }

    /// A 403 on a versioned delete is a refusal (counted as retained by GC), not an
    /// error; other failures stay errors.
    #[test]
    fn refused_delete_is_an_outcome() {
        assert_eq!(delete_outcome(204, ""), Some(Deleted::Done));
        assert_eq!(delete_outcome(404, "NoSuchKey"), Some(Deleted::Done));
        assert_eq!(
            delete_outcome(403, "AccessDenied"),
            Some(Deleted::Refused("HTTP 403 AccessDenied".into()))
        );
        assert_eq!(delete_outcome(500, "InternalError"), None);
        // Only AccessDenied is a refusal: other 403s are errors, not retained versions.
        assert_eq!(delete_outcome(403, "SignatureDoesNotMatch"), None);
        assert_eq!(delete_outcome(403, "RequestTimeTooSkewed"), None);
        assert_eq!(delete_outcome(403, ""), None);
    }

    /// Retries: only 5xx statuses, at most `MAX_RETRIES`, growing, and never past the
    /// deadline.
    #[test]
    fn retries_are_bounded() {
        assert!(transient_status(503) && transient_status(500));
        assert!(!transient_status(403) && !transient_status(404) && !transient_status(412));
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        let waits: Vec<Duration> = (0..10).map_while(|a| backoff(a, now, far)).collect();
        assert_eq!(waits.len(), MAX_RETRIES as usize);
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        assert!(waits[0] >= RETRY_BASE);
        assert_eq!(backoff(0, now, now + Duration::from_millis(100)), None);
    }

    /// A body is read up to the bound and no further: an endless one ends.
    #[tokio::test]
    async fn body_read_is_bounded() {
        let endless = futures::stream::repeat_with(|| Ok::<_, ()>(Bytes::from(vec![7u8; 4096])));
        let body = tokio::time::timeout(Duration::from_secs(10), read_bounded(endless, 10_000))
            .await
            .expect("read past the bound")
            .expect("read");
        assert_eq!(body.len(), 10_000);
        let short = futures::stream::iter([Ok::<_, ()>(Bytes::from_static(b"ab"))]);
        assert_eq!(
            read_bounded(short, 10).await.expect("read"),
            Bytes::from_static(b"ab")
        );
    }

    #[test]
    fn location_constraint_outside_us_east_1() {
        assert!(create_bucket_body("us-east-1").is_empty());
        let body = create_bucket_body("eu-west-1");
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("<LocationConstraint>eu-west-1</LocationConstraint>"),
            "{body}"
        );
        let odd = create_bucket_body("a<b");
        assert!(String::from_utf8_lossy(&odd).contains("a&lt;b"));
    }
}
