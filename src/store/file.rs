//! Placeholder; being implemented.
use async_trait::async_trait;

use super::*;
use crate::config::FileConfig;

#[derive(Debug)]
pub struct FileStore {
    name: String,
}

impl FileStore {
    pub fn new(name: &str, _cfg: &FileConfig) -> StoreResult<Self> {
        Ok(FileStore { name: name.to_string() })
    }
}

#[async_trait]
impl SecretStore for FileStore {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "file"
    }
    async fn read(&self, _path: &str) -> StoreResult<SlotState> {
        todo!()
    }
    async fn apply(&self, _path: &str, _expected: &Version, _t: &Transition) -> StoreResult<SlotState> {
        todo!()
    }
    async fn health(&self) -> StoreResult<()> {
        todo!()
    }
    async fn probe_write(&self, _path: &str) -> StoreResult<()> {
        todo!()
    }
}
