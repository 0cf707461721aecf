//! The shapes a backup is planned with: the options of a run and the enums the CLI, the
//! configuration file and the daemon share (each defined once, here; clap's `ValueEnum`
//! is derived behind the `clap` feature, as rustic_core does).

use serde::{Deserialize, Serialize};

/// What the user asked for with `--mode`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ModeRequest {
    #[default]
    Auto,
    Full,
    Incremental,
}

/// How frozen data travels from the host to the node.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// qemu-nbd on a private unix socket through the SSH connection (encrypted)
    #[default]
    Ssh,
    /// qemu-nbd on plain TCP from the host: UNENCRYPTED, for trusted networks only
    Netcat,
    /// dd of raw images through SSH, for hosts without qemu-nbd (reads every byte; chosen
    /// automatically when qemu-nbd is missing)
    Stream,
}

/// Whether a backup leaves on the host the base the next incremental builds on (the
/// libvirt checkpoint, the RBD snapshot, the thin LVM snapshot, the kept overlay).
/// Every mode keeps it, `--mode full` too: a full is a full read, not a break of the
/// chain. `Remove` (`--no-keep-base`, policy `keep_base = false`) leaves nothing and
/// records that in the manifest, so the next backup's reason says why it is a full.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum BaseOnHost {
    #[default]
    Keep,
    Remove,
}

impl ModeRequest {
    pub fn as_str(self) -> &'static str {
        match self {
            ModeRequest::Auto => "auto",
            ModeRequest::Full => "full",
            ModeRequest::Incremental => "incremental",
        }
    }

    /// The mode named `s` (`auto`, `full`, `incremental`), as the catalog stores it.
    pub fn parse(s: &str) -> Option<ModeRequest> {
        [
            ModeRequest::Auto,
            ModeRequest::Full,
            ModeRequest::Incremental,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

impl std::fmt::Display for ModeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
