//! bench-core: what a flexbench benchmark is, with no framework code.
//!
//! - [`case`]: one benchmark case and its placement policy;
//! - [`model`]: the OPT model registry and size formulas;
//! - [`suite`]: suite files (RON), their validation and expansion into cases;
//! - [`filter`]: `--filter key=value` selection on the cases' JSON fields;
//! - [`prompts`]: the deterministic prompt token ids every framework uses;
//! - [`protocol`]: the child protocol between the orchestrator and runner processes;
//! - [`backend`]: the trait every framework wrapper implements;
//! - [`metrics`]: FlexLLMGen's latency/throughput definitions and projection;
//! - [`record`]: the versioned result record (one JSON line per case);
//! - [`env`](mod@env): the environment captured once per run;
//! - [`store`]: the durable, locked results.jsonl;
//! - [`run`]: the orchestrator (child processes, timeouts, outcome classification).

pub mod backend;
pub mod case;
pub mod env;
pub mod filter;
pub mod metrics;
pub mod model;
pub mod prompts;
pub mod protocol;
pub mod record;
pub mod run;
pub mod store;
pub mod suite;

pub use backend::{Backend, RunContext};
pub use case::{Case, Device, Placement, Policy, Tier, Weights};
pub use model::ModelConfig;
pub use protocol::RawResult;
pub use record::{IdentifiedCase, Outcome, Record};
pub use suite::Suite;
