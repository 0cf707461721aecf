//! virtkeep-engine
