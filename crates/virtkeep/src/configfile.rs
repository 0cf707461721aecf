//! Writing the configuration file the way a person left it: only the entries a command
//! changed are rewritten; comments, order and formatting of everything else stay.

use std::path::Path;

use anyhow::Context;
use toml_edit::{DocumentMut, Item, TableLike};
use virtkeep_engine::config::Config;

/// `text` (the file as it was, `old` parsed from it) brought to `new`.
pub fn edit(text: &str, old: &Config, new: &Config) -> anyhow::Result<String> {
    let fresh_text = toml::to_string_pretty(new).context("serialising the configuration")?;
    if text.trim().is_empty() {
        return Ok(fresh_text);
    }
    let mut doc: DocumentMut = text.parse().context("parsing the configuration file")?;
    let fresh: DocumentMut = fresh_text.parse().context("re-reading the configuration")?;
    let old_v = toml::Table::try_from(old).context("serialising the configuration")?;
    let new_v = toml::Table::try_from(new).context("serialising the configuration")?;
    merge(doc.as_table_mut(), fresh.as_table(), &old_v, &new_v);
    Ok(doc.to_string())
}

/// Touches only the keys whose values differ between `old` and `new`.
fn merge(doc: &mut dyn TableLike, fresh: &dyn TableLike, old: &toml::Table, new: &toml::Table) {
    for (key, new_value) in new {
        let old_value = old.get(key);
        if old_value == Some(new_value) {
            continue;
        }
        let Some(fresh_item) = fresh.get(key) else {
            continue;
        };
        match (doc.get_mut(key), old_value, new_value) {
            (Some(item), Some(toml::Value::Table(o)), toml::Value::Table(n))
                if item.is_table_like() && fresh_item.is_table_like() =>
            {
                if let (Some(d), Some(f)) = (item.as_table_like_mut(), fresh_item.as_table_like()) {
                    merge(d, f, o, n);
                }
            }
            (Some(item), _, _) => replace(item, fresh_item),
            (None, _, _) => {
                doc.insert(key, unplaced(fresh_item));
            }
        }
    }
    let gone: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
    for key in gone {
        doc.remove(key);
    }
}

/// A new value in place of an old one, keeping the old one's comment after it.
fn replace(item: &mut Item, fresh: &Item) {
    let mut new = unplaced(fresh);
    if let (Some(old), Some(value)) = (item.as_value(), new.as_value_mut()) {
        *value.decor_mut() = old.decor().clone();
    }
    *item = new;
}

/// An item from the freshly serialised document without its position there (tables
/// are printed in position order: a new one goes at the end).
fn unplaced(item: &Item) -> Item {
    let mut item = item.clone();
    if let Some(t) = item.as_table_mut() {
        clear_positions(t);
    }
    item
}

fn clear_positions(table: &mut toml_edit::Table) {
    table.set_position(None);
    // A blank line before each new section, as `toml` writes them.
    if !table.is_implicit() {
        table.decor_mut().set_prefix("\n");
    }
    for (_, item) in table.iter_mut() {
        if let Some(t) = item.as_table_mut() {
            clear_positions(t);
        }
    }
}

/// Replaces the file atomically; an existing file keeps its owner, group and mode (root
/// editing /etc/virtkeep/config.toml must leave it readable by the service user), a new
/// one is 0600.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let existing = std::fs::metadata(path).ok();
    let tmp = path.with_extension("toml.tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        if let Some(m) = &existing {
            f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))
                .with_context(|| format!("keeping the owner of {}", path.display()))?;
        }
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
