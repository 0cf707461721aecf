//! virtkeep-repo
