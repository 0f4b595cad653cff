//! keyrotd's integration tests: one binary, so the library and its dependencies are
//! linked once (the AWS SDK alone is most of a test binary's size) and the support
//! code below is compiled once.
//!
//! Run one area with a filter: `cargo test --features failpoints --test it crash::`,
//! one crash-matrix row with `crash::matrix::row_07`. Tests that need OpenBao or moto read
//! their addresses from the variables `scripts/test-servers.sh` exports and fail
//! loudly without them.

// Support code shared by the test modules.
mod e2e;
mod harness;
mod spec_schema;
mod store_support;

mod admin_key;
mod chaos;
mod check_config;
mod cli_docs;
mod config_errors;
mod cores;
mod crash;
mod daemon;
mod decide;
mod demo;
mod expiry;
mod faults;
mod fuzz_api;
mod fuzz_config;
mod hygiene;
mod identity;
mod incident;
mod lifecycle;
mod metrics;
mod moves;
mod notify;
mod openai_client;
mod outside;
mod plan;
mod replicas;
mod report;
mod reread;
mod rotation;
mod scan_bounds;
mod shutdown;
mod sim;
mod store_aws;
mod store_behaviour;
mod store_file;
mod store_secrets;
mod store_vault;
mod usage;
mod usage_cost;
mod walkthrough;
