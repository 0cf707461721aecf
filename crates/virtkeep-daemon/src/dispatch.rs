//! Which queued jobs start now: node and per-host limits, one job per VM at a time,
//! higher priority first, retries not before their backoff has passed. A job counts
//! against the limit of the host it runs on (`slot`): a boot verification runs on its
//! policy's verification host, not on the backed-up VM's.
//!
//! Pure bookkeeping (no I/O), so the rules are tested without a host.

use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: i64,
    pub host: String,
    /// The VM the job touches: the backed-up VM, or a restore's target domain name.
    pub vm: String,
    /// The host whose job limit the job counts against (where it runs).
    pub slot: String,
    pub priority: i64,
    /// Unix seconds before which the job waits (retry backoff).
    pub not_before: i64,
    pub run_id: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Queue {
    pending: Vec<Pending>,
    /// Per running job: (host, VM) and its slot host.
    running: HashMap<i64, ((String, String), String)>,
}

impl Queue {
    /// Queues `p` unless it is queued or running already (a job queued in the catalog
    /// may arrive both through the API's submission and the catalog scan).
    pub fn push(&mut self, p: Pending) {
        if !self.pending.iter().any(|q| q.id == p.id) && !self.running.contains_key(&p.id) {
            self.pending.push(p);
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.running.is_empty()
    }

    /// Takes the jobs that may start at `now` and counts them as running.
    pub fn start(
        &mut self,
        now: i64,
        max_jobs: usize,
        host_limit: &dyn Fn(&str) -> usize,
    ) -> Vec<Pending> {
        self.pending.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.not_before.cmp(&b.not_before))
                .then(a.id.cmp(&b.id))
        });
        let mut per_host: HashMap<String, usize> = HashMap::new();
        let mut busy: HashSet<(String, String)> = HashSet::new();
        for (key, slot) in self.running.values() {
            *per_host.entry(slot.clone()).or_default() += 1;
            busy.insert(key.clone());
        }
        let mut started = Vec::new();
        let mut keep = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let key = (p.host.clone(), p.vm.clone());
            let host_count = per_host.get(&p.slot).copied().unwrap_or(0);
            if self.running.len() < max_jobs
                && p.not_before <= now
                && host_count < host_limit(&p.slot)
                && !busy.contains(&key)
            {
                *per_host.entry(p.slot.clone()).or_default() += 1;
                busy.insert(key.clone());
                self.running.insert(p.id, (key, p.slot.clone()));
                started.push(p);
            } else {
                keep.push(p);
            }
        }
        self.pending = keep;
        started
    }

    /// Counts a job this node claimed from a shared queue as running here.
    pub fn adopt(&mut self, id: i64, host: &str, vm: &str, slot: &str) {
        self.running
            .insert(id, ((host.to_string(), vm.to_string()), slot.to_string()));
    }

    pub fn finished(&mut self, id: i64) {
        self.running.remove(&id);
    }

    /// Removes one queued job (cancelled); whether it was queued here.
    pub fn remove(&mut self, id: i64) -> bool {
        let before = self.pending.len();
        self.pending.retain(|p| p.id != id);
        self.pending.len() != before
    }

    /// Removes the queued jobs of a run; returns their ids.
    pub fn cancel_run(&mut self, run_id: i64) -> Vec<i64> {
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.run_id == Some(run_id));
        self.pending = keep;
        gone.into_iter().map(|p| p.id).collect()
    }

    /// The earliest `not_before` among queued jobs that wait for time alone.
    pub fn next_wake(&self, now: i64) -> Option<i64> {
        self.pending
            .iter()
            .map(|p| p.not_before)
            .filter(|t| *t > now)
            .min()
    }
}

/// A job running somewhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub node: String,
    pub host: String,
    pub vm: String,
    /// The host whose job limit it counts against.
    pub slot: String,
}

/// The same rules over a shared queue: which of `queued` (due now, best first) node
/// `node` takes, given every job `running` in the cluster. One job per VM and the
/// per-host limits count all nodes; `max_jobs` counts this node's jobs only.
pub fn choose(
    node: &str,
    queued: &[Pending],
    running: &[Running],
    max_jobs: usize,
    host_limit: &dyn Fn(&str) -> usize,
) -> Vec<i64> {
    let mut mine = running.iter().filter(|r| r.node == node).count();
    let mut per_host: HashMap<&str, usize> = HashMap::new();
    let mut busy: HashSet<(&str, &str)> = HashSet::new();
    for r in running {
        *per_host.entry(&r.slot).or_default() += 1;
        busy.insert((&r.host, &r.vm));
    }
    let mut order: Vec<&Pending> = queued.iter().collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.not_before.cmp(&b.not_before))
            .then(a.id.cmp(&b.id))
    });
    let mut chosen = Vec::new();
    for p in order {
        if mine >= max_jobs {
            break;
        }
        let on_host = per_host.get(p.slot.as_str()).copied().unwrap_or(0);
        if on_host < host_limit(&p.slot) && busy.insert((&p.host, &p.vm)) {
            *per_host.entry(&p.slot).or_default() += 1;
            mine += 1;
            chosen.push(p.id);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: i64, host: &str, vm: &str, priority: i64) -> Pending {
        Pending {
            id,
            host: host.into(),
            vm: vm.into(),
            slot: host.into(),
            priority,
            not_before: 0,
            run_id: Some(1),
        }
    }

    fn ids(v: &[Pending]) -> Vec<i64> {
        v.iter().map(|p| p.id).collect()
    }

    #[test]
    fn limits_priority_and_one_job_per_vm() {
        let mut q = Queue::default();
        q.push(p(1, "a", "vm1", 0));
        q.push(p(2, "a", "vm1", 0)); // same VM: waits for job 1
        q.push(p(3, "a", "vm2", 5));
        q.push(p(4, "b", "vm3", 0));
        q.push(p(5, "b", "vm4", 0));
        let limit = |h: &str| if h == "a" { 2 } else { 1 };
        // Node limit 3: priority 5 first, then by id; host b takes one.
        let s = q.start(10, 3, &limit);
        assert_eq!(ids(&s), vec![3, 1, 4]);
        assert_eq!(ids(&q.start(10, 3, &limit)), Vec::<i64>::new());
        q.finished(1);
        assert_eq!(ids(&q.start(10, 3, &limit)), vec![2]);
        q.finished(4);
        assert_eq!(ids(&q.start(10, 3, &limit)), vec![5]);
    }

    fn r(node: &str, host: &str, vm: &str) -> Running {
        Running {
            node: node.into(),
            host: host.into(),
            vm: vm.into(),
            slot: host.into(),
        }
    }

    /// A boot verification of a VM of host `a` that runs on host `v` takes a slot of
    /// `v`, not of `a`, and still never runs beside a job of the same VM.
    #[test]
    fn a_job_takes_a_slot_of_the_host_it_runs_on() {
        let verify = |id, vm: &str| Pending {
            slot: "v".into(),
            ..p(id, "a", vm, 0)
        };
        let mut q = Queue::default();
        q.push(p(1, "a", "vm1", 9));
        q.push(verify(2, "vm2"));
        q.push(verify(3, "vm3"));
        q.push(verify(4, "vm1"));
        let one = |_: &str| 1;
        // Host a is full with job 1; v takes one verification; vm1's waits for job 1.
        assert_eq!(ids(&q.start(0, 9, &one)), vec![1, 2]);
        q.finished(2);
        assert_eq!(ids(&q.start(0, 9, &one)), vec![3]);
        q.finished(1);
        q.finished(3);
        assert_eq!(ids(&q.start(0, 9, &one)), vec![4]);
        let queued = [p(5, "a", "vm5", 0), verify(6, "vm6")];
        let running = [r("n2", "a", "vm1")];
        assert_eq!(choose("n1", &queued, &running, 9, &one), vec![6]);
    }

    #[test]
    fn a_node_takes_within_the_cluster_limits() {
        let queued = [
            p(1, "a", "vm1", 0),
            p(2, "a", "vm2", 0),
            p(3, "a", "vm3", 7),
            p(4, "b", "vm4", 0),
            p(5, "b", "vm4", 0),
            p(6, "b", "vm5", 0),
        ];
        // vm1 runs on another node: never a second job on it; host a allows 2 and
        // already has 1 (n2's), so only the best of vm2/vm3 starts there.
        let running = [r("n2", "a", "vm1"), r("n1", "b", "vm9")];
        let limit = |_: &str| 2;
        assert_eq!(choose("n1", &queued, &running, 3, &limit), vec![3, 4]);
        // This node's own capacity counts only its jobs.
        assert_eq!(choose("n1", &queued, &running, 2, &limit), vec![3]);
        assert_eq!(choose("n2", &queued, &running, 2, &limit), vec![3]);
        // Two queued jobs of one VM: one at a time, even with room everywhere.
        let wide = |_: &str| 10;
        assert_eq!(choose("n3", &queued, &[], 10, &wide), vec![3, 1, 2, 4, 6]);
    }

    #[test]
    fn backoff_and_cancel() {
        let mut q = Queue::default();
        let mut r = p(1, "a", "vm1", 0);
        r.not_before = 100;
        q.push(r);
        q.push(p(2, "a", "vm2", 0));
        assert_eq!(q.next_wake(50), Some(100));
        assert_eq!(ids(&q.start(50, 5, &|_| 1)), vec![2]);
        q.finished(2);
        assert_eq!(q.cancel_run(1), vec![1]);
        assert!(q.is_idle());
    }

    #[test]
    fn a_cancelled_job_leaves_the_queue_and_frees_its_vm() {
        let mut q = Queue::default();
        q.push(p(1, "a", "vm1", 0));
        q.push(p(2, "a", "vm2", 9));
        assert!(q.remove(2));
        assert!(!q.remove(2), "already gone");
        assert!(!q.remove(7), "never queued");
        assert_eq!(ids(&q.start(0, 5, &|_| 5)), vec![1]);
        assert!(!q.remove(1), "a running job is not in the queue");
    }
}
