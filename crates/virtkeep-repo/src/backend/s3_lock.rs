//! S3 Object Lock: the few requests `object_store` cannot send (a bucket created with
//! Object Lock, per-object retention on PUT, `PutObjectRetention`, deletes of one
//! version), as SigV4-signed raw requests through `object_store`'s own HTTP client and
//! signer, and [`LockedS3Backend`], the S3 backend of a repository made with
//! `repo init --object-lock`. docs/format.md ("Object Lock") describes the protocol.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ChunkBackend, ObjectInfo, ObjectLock, PutOutcome, S3Backend};
use crate::error::{RepoError, Result};

/// Deadline of one raw request (a chunk PUT of at most 16 MiB included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest response body read (bucket lock configuration, error documents).
const MAX_BODY: usize = 1 << 20;

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

struct Response {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
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

    /// The storage's current time (our clock corrected by the last `Date` seen).
    pub fn now(&self) -> SystemTime {
        let off = self.clock_offset_ms.load(Ordering::Relaxed);
        let now = SystemTime::now();
        if off >= 0 {
            now + Duration::from_millis(off.unsigned_abs())
        } else {
            now - Duration::from_millis(off.unsigned_abs())
        }
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

    /// One signed request; the body is read (bounded) whatever the status.
    async fn send(
        &self,
        method: http::Method,
        url: String,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Response> {
        let what = url.clone();
        let cred = self.credential.as_ref().ok_or_else(|| {
            RepoError::InvalidArgument(
                "S3 Object Lock requests need static keys (AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or s3_access_key/s3_secret_key)"
                    .into(),
            )
        })?;
        let mut b = http::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let mut req = b
            .body(HttpRequestBody::from(body))
            .map_err(|e| RepoError::backend(what.clone(), e))?;
        AwsAuthorizer::new(cred, "s3", &self.region)
            .try_authorize(&mut req, Some(digest.as_ref()))
            .map_err(|e| RepoError::backend(what.clone(), e))?;
        let call = async {
            let resp = self.client()?.execute(req).await;
            let resp = resp.map_err(|e| RepoError::backend(what.clone(), e))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .bytes()
                .await
                .map_err(|e| RepoError::backend(what.clone(), e))?;
            Ok::<_, RepoError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| RepoError::backend(what.clone(), "request timed out"))??;
        if let Some(d) = header_time(&parts.headers, "date", true) {
            let off = ms_diff(d, SystemTime::now());
            self.clock_offset_ms.store(off, Ordering::Relaxed);
        }
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.slice(..body.len().min(MAX_BODY)),
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

    /// Create the bucket with Object Lock enabled (which also turns on versioning).
    pub async fn create_locked_bucket(&self) -> Result<()> {
        let headers = [("x-amz-bucket-object-lock-enabled", "true".to_string())];
        let r = self
            .send(
                http::Method::PUT,
                self.url(None, ""),
                &headers,
                Bytes::new(),
            )
            .await?;
        match r.status {
            200 => Ok(()),
            _ => Err(self.fail(&self.bucket, &r)),
        }
    }

    /// PUT with retention `lock` until `now + retain`; `create_only`: not over an
    /// existing object ([`PutOutcome::Existed`]).
    pub async fn put_locked(
        &self,
        key: &str,
        data: Bytes,
        lock: &ObjectLock,
        create_only: bool,
    ) -> Result<PutOutcome> {
        let mut headers = lock_headers(lock, self.now() + lock.retain, &data);
        if create_only {
            headers.push(("if-none-match", "*".into()));
        }
        let r = self
            .send(http::Method::PUT, self.url(Some(key), ""), &headers, data)
            .await?;
        match r.status {
            200 => Ok(PutOutcome::Created),
            412 if create_only => Ok(PutOutcome::Existed),
            _ => Err(self.fail(key, &r)),
        }
    }

    /// Extend the current version's retention to `now + retain` (`PutObjectRetention`);
    /// `false` when the object is gone.
    pub async fn extend(&self, key: &str, lock: &ObjectLock) -> Result<bool> {
        let until = fmt_time(self.now() + lock.retain);
        let body = Bytes::from(format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode>\
             <RetainUntilDate>{until}</RetainUntilDate></Retention>",
            lock.mode.as_s3()
        ));
        let headers = [("content-md5", content_md5(&body))];
        let r = self
            .send(
                http::Method::PUT,
                self.url(Some(key), "retention="),
                &headers,
                body,
            )
            .await?;
        match r.status {
            200 | 204 => Ok(true),
            404 => Ok(false),
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
    ) -> Result<()> {
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
            )
            .await?;
        match r.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.fail(key, &r)),
        }
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

fn fmt_time(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
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
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The text of the first `<tag>…</tag>` (S3's XML answers are flat enough for this).
fn xml_value(doc: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = doc.find(&open)? + open.len();
    let len = doc[start..].find(&format!("</{tag}>"))?;
    Some(doc[start..start + len].trim().to_string())
}

/// Chunks, indexes and manifests get retention; leases, the config and `protected`
/// markers stay deletable and rewritable.
fn retained(key: &str) -> bool {
    if key.starts_with("chunks/") {
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

    /// A retained object's modification time for the GC and reuse rules: when its
    /// retention was last set (extended), not when its bytes were written.
    fn lock_time(&self, h: &LockHead) -> SystemTime {
        h.retain_until
            .and_then(|u| u.checked_sub(self.lock.retain))
            .map_or(h.info.modified, |t| t.max(h.info.modified))
    }
}

#[async_trait]
impl ChunkBackend for LockedS3Backend {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome> {
        if !retained(key) {
            return self.inner.put_if_absent(key, data).await;
        }
        self.inner.raw.put_locked(key, data, &self.lock, true).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        if !retained(key) {
            return self.inner.put(key, data).await;
        }
        // A chunk is content-addressed: the same bytes are there, only their retention
        // needs to move (a re-upload would leave one more locked version behind).
        if key.starts_with("chunks/") && self.inner.raw.extend(key, &self.lock).await? {
            return Ok(());
        }
        self.inner
            .raw
            .put_locked(key, data, &self.lock, false)
            .await?;
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
        raw.delete_version(key, h.version.as_deref(), false).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn extend_retention(&self, key: &str) -> Result<bool> {
        if !retained(key) {
            return Ok(true);
        }
        self.inner.raw.extend(key, &self.lock).await
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
        assert!(!retained("config"));
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
}
