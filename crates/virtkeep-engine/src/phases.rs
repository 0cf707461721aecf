//! Where a backup's time went: wall time per phase, reported in `backup --json` as
//! `phases` so that users and benchmarks see which part grew.

use std::time::Instant;

use serde::Serialize;

/// Seconds spent in each phase of one backup. `connect_secs` is filled by the caller
/// that opened the SSH connection (the engine receives a connected host).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Phases {
    pub connect_secs: f64,
    /// Looking the VM up, taking its lock on the host, loading its definition.
    pub lock_load_secs: f64,
    /// Healing leftovers, the plan, choosing full or incremental and finding the bases.
    pub plan_secs: f64,
    /// Pre/post-snapshot commands and the freeze (snapshots, checkpoint, backup job).
    pub freeze_secs: f64,
    /// Reading the frozen data into the repository.
    pub data_secs: f64,
    /// Publishing indexes and manifest, keeping the next base.
    pub publish_secs: f64,
    /// Returning the VM to its own disks and removing the job's leftovers.
    pub heal_secs: f64,
}

/// Which phase a lap of [`PhaseClock`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    LockLoad,
    Plan,
    Freeze,
    Data,
    Publish,
    Heal,
}

/// A lap timer: each `lap` adds the time since the previous one to a phase.
#[derive(Debug)]
pub struct PhaseClock {
    started: Instant,
    last: Instant,
    phases: Phases,
}

impl Default for PhaseClock {
    fn default() -> Self {
        Self::new()
    }
}

impl PhaseClock {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            phases: Phases::default(),
        }
    }

    pub fn lap(&mut self, phase: Phase) {
        let now = Instant::now();
        *slot(&mut self.phases, phase) += now.duration_since(self.last).as_secs_f64();
        self.last = now;
    }

    /// Ends a lap of `from`, of which the last `secs` belonged to `to` (a phase that
    /// was measured inside another, such as publishing at the end of the data phase).
    pub fn lap_split(&mut self, from: Phase, to: Phase, secs: f64) {
        self.lap(from);
        let secs = secs.min(*slot(&mut self.phases, from)).max(0.0);
        *slot(&mut self.phases, from) -= secs;
        *slot(&mut self.phases, to) += secs;
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn phases(&self) -> Phases {
        self.phases.clone()
    }
}

fn slot(p: &mut Phases, phase: Phase) -> &mut f64 {
    match phase {
        Phase::LockLoad => &mut p.lock_load_secs,
        Phase::Plan => &mut p.plan_secs,
        Phase::Freeze => &mut p.freeze_secs,
        Phase::Data => &mut p.data_secs,
        Phase::Publish => &mut p.publish_secs,
        Phase::Heal => &mut p.heal_secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_add_up_and_split_moves_time_between_phases() {
        let mut c = PhaseClock::new();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.lap(Phase::Plan);
        std::thread::sleep(std::time::Duration::from_millis(30));
        c.lap_split(Phase::Data, Phase::Publish, 0.01);
        let p = c.phases();
        assert!(p.plan_secs >= 0.02, "{p:?}");
        assert!(p.data_secs >= 0.02 && p.publish_secs == 0.01, "{p:?}");
        let sum = p.plan_secs + p.data_secs + p.publish_secs;
        assert!(sum <= c.elapsed_secs() + 1e-9, "{p:?}");
        // A split larger than the lap cannot make a phase negative.
        c.lap_split(Phase::Heal, Phase::Freeze, 100.0);
        assert!(c.phases().heal_secs >= 0.0 && c.phases().freeze_secs < 1.0);
    }
}
