//! bench-core: what a flexbench benchmark is, with no framework code.
//!
//! - [`case`]: one benchmark case and its placement policy;
//! - [`model`]: the OPT model registry and size formulas;
//! - [`prompts`]: the deterministic prompt token ids every framework uses;
//! - [`protocol`]: the child protocol between the orchestrator and runner processes;
//! - [`backend`]: the trait every framework wrapper implements.

pub mod backend;
pub mod case;
pub mod model;
pub mod prompts;
pub mod protocol;

pub use backend::{Backend, RunContext};
pub use case::{Case, Device, Placement, Policy, Tier, Weights};
pub use model::ModelConfig;
pub use protocol::RawResult;
