//! Weight units fetched ahead of their use: each fetch goes to the thread that can start it
//! (none when the unit is resident, the disk thread for disk reads, the transfer thread for
//! copies), [`LOOKAHEAD`] units ahead of the one the compute thread waits for.

use std::sync::mpsc::channel;

use anyhow::{Context, Result};

use super::model::OffloadModel;
use super::queue::Pending;
use super::run::Run;
use crate::device::Device;
use crate::offload::weights::Fetched;

/// Weight units fetched ahead of the one in use (with overlap on).
pub const LOOKAHEAD: usize = 2;

impl<'a, D: Device> Run<'a, D> {
    /// Submits the fetch of weight unit `idx % units` (of step `idx / units`).
    fn submit_fetch(&mut self, idx: usize) {
        let unit = idx % self.units();
        let (tx, rx) = channel();
        let model: &'a OffloadModel<D::Tensor> = self.model;
        let w = &model.weights;
        let dev = self.dev;
        if w.is_resident(unit) {
            // nothing moves: no thread needed
            tx.send(w.materialize(dev, unit, None)).ok();
        } else if w.stages_disk_reads(dev, unit) {
            // reads and copies in one job on the disk thread
            self.disk_q.push(
                false,
                Box::new(move || {
                    tx.send(w.fetch_staged(dev, unit)).ok();
                }),
            );
        } else if w.has_disk(unit) {
            let xfer = self.xfer_q.clone();
            self.disk_q.push(
                false,
                Box::new(move || match w.read_disk(dev, unit) {
                    Ok(d) => xfer.push(
                        false,
                        Box::new(move || {
                            tx.send(w.materialize(dev, unit, Some(d))).ok();
                        }),
                    ),
                    Err(e) => {
                        tx.send(Err(e)).ok();
                    }
                }),
            );
        } else {
            self.xfer_q.push(
                false,
                Box::new(move || {
                    tx.send(w.materialize(dev, unit, None)).ok();
                }),
            );
        }
        self.fetches.push_back(Pending(rx));
    }

    /// Weight unit `idx`, with the next ones submitted behind it.
    pub(super) fn weights(&mut self, idx: usize) -> Result<Fetched<D::Tensor>> {
        let ahead = if self.sched.overlap { LOOKAHEAD } else { 0 };
        while self.fetch_next <= idx + ahead && self.fetch_next < self.fetch_total {
            self.submit_fetch(self.fetch_next);
            self.fetch_next += 1;
        }
        let p = self
            .fetches
            .pop_front()
            .context("weight fetches out of order")?;
        let mut f = p.wait(
            self.stats,
            &format!("fetching weight unit {}", idx % self.units()),
        )?;
        // the copies may still be in flight on the device's upload stream: the kernels queued
        // from here on wait for them on the device, not here
        f.ready(self.dev)?;
        Ok(f)
    }
}
