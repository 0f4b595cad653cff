//! In-process OpenAI Admin API simulator (see `keyrotd sim`, `keyrotd demo`, tests).
