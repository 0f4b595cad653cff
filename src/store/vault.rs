//! Placeholder; being implemented.
use async_trait::async_trait;

use super::*;
use crate::config::VaultConfig;

#[derive(Debug)]
pub struct VaultStore {
    name: String,
}

impl VaultStore {
    pub async fn connect(name: &str, _cfg: &VaultConfig) -> StoreResult<Self> {
        Ok(VaultStore { name: name.to_string() })
    }
}

#[async_trait]
impl SecretStore for VaultStore {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "vault"
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
