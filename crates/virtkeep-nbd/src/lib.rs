//! virtkeep-nbd
