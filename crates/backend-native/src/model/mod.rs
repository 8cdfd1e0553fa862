//! OPT models: configuration, weights (HuggingFace safetensors checkpoints or dummy), the layer
//! math over any [`crate::device::Device`].

pub mod checkpoint;
pub mod config;
pub mod layers;
pub mod weights;

pub use checkpoint::{Checkpoint, DummySource, TensorSource};
pub use config::load_config;
pub use weights::{AttnWeights, GlobalWeights, LayerWeights, MlpWeights, ModelWeights};
