//! The link between the two nodes of a resource: wire format, authentication, connections.

pub mod auth;
pub mod link;
pub mod wire;
