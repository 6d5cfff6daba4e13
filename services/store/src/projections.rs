//! The read models Kiln ships. Each is a `Projection`; `all()` lists them for the runner and
//! for `kiln projections rebuild|verify`.

mod runs;
mod tool_catalog;

use std::sync::Arc;

pub use runs::Runs;
pub use tool_catalog::ToolCatalog;

use crate::projection::Projection;
use crate::{Result, StoreError};

/// Every projection, in the order they are run.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(ToolCatalog), Arc::new(Runs)]
}

/// One projection by name.
pub fn by_name(name: &str) -> Result<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name).ok_or_else(|| StoreError::UnknownProjection(name.to_owned()))
}
