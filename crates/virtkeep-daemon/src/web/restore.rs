//! The restore wizard (admin scope): pick a backup and where it goes → the engine's
//! plan (`restore --dry-run`: destinations, sizes, XML changes) → run → follow the job.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use virtkeep_engine::progress::NoProgress;
use virtkeep_engine::restore::{RestoreOptions, RestoreResult, restore};

use super::jobs::{Submission, submit};
use super::view::{Viewer, WebState, bytes, layout, page_error};
use crate::scope::Action;
use crate::task::{JobRequest, open_repository, parse_storage};

/// Longest field of the wizard's forms.
const MAX_FIELD: usize = 512;
/// At most this many backups listed on the first page.
const MAX_LISTED: usize = 500;

/// The wizard's choices, carried from page to page.
#[derive(Debug, Default, Deserialize)]
pub struct Choice {
    #[serde(default)]
    snapshot: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    storage: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    vm: String,
    define: Option<String>,
    start: Option<String>,
    force: Option<String>,
    #[serde(default)]
    csrf: String,
}

impl Choice {
    fn too_long(&self) -> bool {
        [
            &self.snapshot,
            &self.host,
            &self.storage,
            &self.name,
            &self.vm,
        ]
        .iter()
        .any(|f| f.len() > MAX_FIELD)
    }

    fn opt(s: &str) -> Option<String> {
        (!s.trim().is_empty()).then(|| s.trim().to_string())
    }

    fn request(&self) -> JobRequest {
        JobRequest::Restore {
            snapshot: self.snapshot.clone(),
            name: Choice::opt(&self.name),
            storage: Choice::opt(&self.storage),
            define: self.define.is_some(),
            start: self.start.is_some(),
            force: self.force.is_some(),
            repository: None,
            live: false,
        }
    }

    /// The choices as hidden fields, for the next step's form.
    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="snapshot" value=(self.snapshot);
            input type="hidden" name="host" value=(self.host);
            input type="hidden" name="storage" value=(self.storage);
            input type="hidden" name="name" value=(self.name);
            @if self.define.is_some() { input type="hidden" name="define" value="on"; }
            @if self.start.is_some() { input type="hidden" name="start" value="on"; }
            @if self.force.is_some() { input type="hidden" name="force" value="on"; }
        }
    }
}

fn bad(msg: &str) -> Response {
    page_error(StatusCode::BAD_REQUEST, "Bad request", msg)
}

fn target_fields(s: &WebState, c: &Choice) -> Markup {
    html! {
        fieldset {
            legend { "2. Where to" }
            label for="r-host" { "Target host" }
            select #r-host name="host" required {
                @for h in s.api.env.engine.hosts.keys() { option value=(h) selected[*h == c.host] { (h) } }
            }
            label for="r-storage" { "Storage (empty: the original places)" }
            input #r-storage name="storage" value=(c.storage) placeholder="file:/DIR, rbd:POOL or lvm:VG" maxlength=(MAX_FIELD);
            label for="r-name" { "New VM name (empty: the original name)" }
            input #r-name name="name" value=(c.name) maxlength=(MAX_FIELD);
            div.checks {
                label { input type="checkbox" name="define" checked[c.define.is_some()]; " define the VM" }
                label { input type="checkbox" name="start" checked[c.start.is_some()]; " start it" }
                label { input type="checkbox" name="force" checked[c.force.is_some()]; " replace existing files / a stopped VM of that name" }
            }
        }
    }
}

/// Step 1 and 2: the backups in the default repository (optionally of one VM), and the target.
pub async fn pick(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Query(c): Query<Choice>,
) -> Response {
    if let Some(r) = v.refuse(Action::SubmitRestore) {
        return r;
    }
    if c.too_long() {
        return bad("A field is too long.");
    }
    let listed = match open_repository(&s.api.env.default_repository).await {
        Ok(repo) => repo.snapshots().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let mut list = match listed {
        Ok(l) => l,
        Err(e) => return page_error(StatusCode::BAD_GATEWAY, "Repository error", &e),
    };
    list.retain(|b| c.vm.is_empty() || b.vm == c.vm);
    list.sort_by_key(|b| std::cmp::Reverse(b.time));
    list.truncate(MAX_LISTED);
    let body = html! {
        form.filters method="get" action="/ui/restore" role="search" {
            label for="r-vm" { "Only backups of VM" }
            input #r-vm name="vm" value=(c.vm) maxlength=(MAX_FIELD);
            button type="submit" { "Filter" }
        }
        form method="get" action="/ui/restore/plan" {
            fieldset {
                legend { "1. Backup" }
                @if list.is_empty() { p { "No backups." } }
                @for (i, b) in list.iter().enumerate() {
                    div.choice {
                        input type="radio" name="snapshot" id={"b-" (i)} value=(b.id) required checked[b.id == c.snapshot];
                        label for={"b-" (i)} {
                            strong { (b.vm) } " on " (b.host) " · " (b.time.to_string()) " · "
                            (format!("{:?}", b.mode).to_lowercase()) " · " (bytes(b.size))
                            span.small.muted { " " (b.id) }
                        }
                    }
                }
            }
            (target_fields(&s, &c))
            button type="submit" { "3. Show the plan" }
        }
    };
    layout("Restore", Some(&v), body).into_response()
}

fn plan_view(p: &RestoreResult) -> Markup {
    html! {
        table {
            caption { "Disks" }
            thead { tr { th scope="col" { "Disk" } th scope="col" { "Destination" } th scope="col" { "Format" } th scope="col" { "Size" } } }
            tbody { @for d in &p.disks { tr {
                th scope="row" data-label="Disk" { (d.target) }
                td data-label="Destination" { code { (d.path) } }
                td data-label="Format" { (d.format) }
                td data-label="Size" { (bytes(d.size)) }
            } } }
        }
        @if !p.replaces.is_empty() {
            p.error role="alert" { "Replaces existing: " (p.replaces.join(", ")) }
        }
        @if !p.xml_changes.is_empty() {
            h2 { "Changes to the VM's XML" }
            ul { @for x in &p.xml_changes { li { (x) } } }
        }
        @if !p.notes.is_empty() {
            h2 { "Notes" }
            ul { @for n in &p.notes { li { (n) } } }
        }
    }
}

/// Step 3: the engine's dry run on the target host; nothing is written.
pub async fn plan(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Query(c): Query<Choice>,
) -> Response {
    if let Some(r) = v.refuse(Action::SubmitRestore) {
        return r;
    }
    if c.too_long() || c.snapshot.is_empty() || !s.api.env.engine.hosts.contains_key(&c.host) {
        return bad("Pick a backup and a host from the configuration.");
    }
    let storage = match parse_storage(Choice::opt(&c.storage).as_deref()) {
        Ok(st) => st,
        Err(e) => return bad(&e.to_string()),
    };
    let opts = RestoreOptions {
        snapshot: c.snapshot.clone(),
        name: Choice::opt(&c.name),
        storage,
        define: c.define.is_some() || c.start.is_some(),
        start: c.start.is_some(),
        force: c.force.is_some(),
        parallel: 2,
        dry_run: true,
        ..RestoreOptions::default()
    };
    let planned = async {
        let repo = open_repository(&s.api.env.default_repository).await?;
        let host = s.api.env.connect(&c.host).await?;
        restore(&host, &repo, &opts, Arc::new(NoProgress)).await
    }
    .await;
    let body = match planned {
        Err(e) => html! {
            p.error role="alert" { "The plan failed: " (e.to_string()) }
            @if let Some(h) = &e.hint { p.hint { (h) } }
            p { a href="/ui/restore" { "Back" } }
        },
        Ok(p) => html! {
            p { "Backup " code { (p.snapshot) } " of " strong { (p.vm) } " to host " (c.host)
                @if p.defined { " (the VM will be defined)" } }
            (plan_view(&p))
            form method="post" action="/ui/restore" {
                (v.csrf_field())
                (c.hidden())
                input type="hidden" name="vm" value=(p.vm);
                button.danger type="submit" { "4. Run the restore" }
            }
            p { a href="/ui/restore" { "Change the choices" } }
        },
    };
    layout("Restore plan", Some(&v), body).into_response()
}

/// Step 4: queue the restore and follow its job.
pub async fn run(
    State(s): State<Arc<WebState>>,
    Extension(v): Extension<Viewer>,
    Form(c): Form<Choice>,
) -> Response {
    if let Some(r) = v
        .bad_csrf(&c.csrf)
        .or_else(|| v.refuse(Action::SubmitRestore))
    {
        return r;
    }
    if c.too_long() || c.snapshot.is_empty() || !s.api.env.engine.hosts.contains_key(&c.host) {
        return bad("Pick a backup and a host from the configuration.");
    }
    if let Err(e) = parse_storage(Choice::opt(&c.storage).as_deref()) {
        return bad(&e.to_string());
    }
    let request = c.request();
    let vm = Choice::opt(&c.name)
        .or_else(|| Choice::opt(&c.vm))
        .unwrap_or_else(|| c.snapshot.clone());
    let job = Submission {
        host: c.host.clone(),
        vm,
        policy: None,
        request,
    };
    match submit(&s, job).await {
        Ok(id) => Redirect::to(&format!("/ui/jobs/{id}")).into_response(),
        Err(r) => *r,
    }
}
