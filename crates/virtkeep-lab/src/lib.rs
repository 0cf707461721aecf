//! virtkeep-lab
