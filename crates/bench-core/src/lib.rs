//! bench-core: what a flexbench benchmark is, with no framework code. Every framework-specific
//! answer comes from a [`Backend`]; nothing here names a framework.
//!
//! - [`case`]: one benchmark case and its placement policy; [`auto`]: what a case leaves to the
//!   backend to choose and how it was resolved; [`memory`]: per-tier memory limits and sizes;
//! - [`model`]: the OPT model registry, size formulas and tensor [`model::layout`];
//! - [`suite`]: suite files (RON), their validation and expansion into cases;
//! - [`filter`]: `--filter key=value` selection on the cases' JSON fields;
//! - [`backend`]: the trait every framework wrapper implements, and the [`Frameworks`] it defines;
//! - [`protocol`]: the child protocol between the orchestrator and runner processes;
//! - shared runner inputs: [`dummy`] weights, dummy HuggingFace [`checkpoint`]s, [`prompts`],
//!   and [`inputs`] (where a case's checkpoint and prompts are);
//! - [`pyenv`]: the Python environment the Python-runner backends share;
//! - [`metrics`]: FlexLLMGen's latency/throughput definitions and projection;
//! - [`record`]: the versioned result record (one JSON line per case);
//! - [`env`](mod@env): the environment captured once per run;
//! - [`store`]: the durable, locked results.jsonl;
//! - [`run`]: the orchestrator (suite loop, process supervision, outcome classification);
//! - [`table`]: plain-text tables; [`dirs`]: the shared cache directory; [`hash`]: stable hashes; [`testkit`]: helpers for
//!   backends' tests with real runners.

pub mod auto;
pub mod backend;
pub mod case;
pub mod checkpoint;
pub mod dirs;
pub mod dummy;
pub mod env;
pub mod filter;
pub mod hash;
pub mod inputs;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod prompts;
pub mod protocol;
pub mod pyenv;
pub mod record;
pub mod run;
pub mod stats;
pub mod store;
pub mod suite;
pub mod table;
pub mod testkit;

pub use backend::{Backend, BuildStep, DiskNeed, Frameworks, RunContext};
pub use case::{Case, Device, Placement, Policy, Tier, Weights};
pub use model::ModelConfig;
pub use protocol::RawResult;
pub use record::{IdentifiedCase, Outcome, Record};
pub use suite::Suite;
