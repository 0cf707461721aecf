//! virtkeep-ssh
