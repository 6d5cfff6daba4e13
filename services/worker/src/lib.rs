//! Kiln's worker: runs tool code. [`sandbox`] is the execution layer (a pool of warm Deno
//! processes behind the [`Sandbox`] trait); run execution (attempts, steps, retries) builds on it.

pub mod queue;
pub mod replay;
pub mod runs;
pub mod sandbox;
#[cfg(feature = "testing")]
pub mod testing;

pub use sandbox::{DenoSandbox, Invocation, InvocationOutput, Sandbox, SandboxConfig, SandboxError, ToolVersion};
