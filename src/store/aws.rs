//! Placeholder; being implemented.
use async_trait::async_trait;

use super::*;
use crate::config::AwsConfig;

#[derive(Debug)]
pub struct AwsStore {
    name: String,
}

impl AwsStore {
    pub async fn connect(name: &str, _cfg: &AwsConfig) -> StoreResult<Self> {
        Ok(AwsStore { name: name.to_string() })
    }
}

#[async_trait]
impl SecretStore for AwsStore {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "aws"
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
