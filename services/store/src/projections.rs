//! The read models Kiln ships. Each is a `Projection`; `all()` lists them for the runner and
//! for `kiln projections rebuild|verify`.

mod audit;
mod runs;
mod tool_catalog;
mod tool_versions;

use std::sync::Arc;

pub use audit::Audit;
pub use runs::Runs;
pub use tool_catalog::ToolCatalog;
pub use tool_versions::ToolVersions;

use crate::projection::Projection;
use crate::{Result, StoreError};

/// Every projection, in the order they are run.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![Arc::new(ToolCatalog), Arc::new(Runs), Arc::new(ToolVersions), Arc::new(Audit)]
}

/// One projection by name.
pub fn by_name(name: &str) -> Result<Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name).ok_or_else(|| StoreError::UnknownProjection(name.to_owned()))
}
