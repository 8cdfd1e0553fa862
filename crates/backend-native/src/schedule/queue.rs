//! The background threads' work queues: each thread (disk, transfer) runs jobs from a
//! two-level queue, cache jobs before weight prefetches, and hands results back through a
//! `Pending` whose wait counts as I/O wait. Without overlap the jobs run inline instead.

use std::collections::VecDeque;
use std::sync::mpsc::Receiver;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use crate::offload::stats::Stats;

pub(super) type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

#[derive(Default)]
struct QueueState<'a> {
    high: VecDeque<Job<'a>>,
    low: VecDeque<Job<'a>>,
    closed: bool,
}

/// A worker thread's queue: cache jobs (high) before weight prefetches (low).
pub(super) struct Queue<'a> {
    state: Mutex<QueueState<'a>>,
    cv: Condvar,
    /// Without overlap, jobs run at once on the submitting thread.
    inline: bool,
}

impl<'a> Queue<'a> {
    pub(super) fn new(inline: bool) -> Queue<'a> {
        Queue {
            state: Mutex::new(QueueState {
                high: VecDeque::new(),
                low: VecDeque::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            inline,
        }
    }
    pub(super) fn push(&self, high: bool, job: Job<'a>) {
        if self.inline {
            job();
            return;
        }
        let mut s = self.state.lock().expect("queue lock");
        if high {
            s.high.push_back(job);
        } else {
            s.low.push_back(job);
        }
        self.cv.notify_one();
    }
    pub(super) fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.cv.notify_all();
    }
    pub(super) fn run(&self) {
        loop {
            let job = {
                let mut s = self.state.lock().expect("queue lock");
                loop {
                    if let Some(j) = s.high.pop_front().or_else(|| s.low.pop_front()) {
                        break j;
                    }
                    if s.closed {
                        return;
                    }
                    s = self.cv.wait(s).expect("queue lock");
                }
            };
            job();
        }
    }
}

/// A result another thread is producing.
pub(super) struct Pending<T>(pub(super) Receiver<Result<T>>);

impl<T> Pending<T> {
    pub(super) fn wait(self, stats: &Stats, what: &str) -> Result<T> {
        let t0 = Instant::now();
        let r = self
            .0
            .recv()
            .map_err(|_| anyhow!("the I/O thread stopped before {what}"))?;
        stats.add_io_wait(t0.elapsed().as_secs_f64());
        r.with_context(|| what.to_string())
    }
}
