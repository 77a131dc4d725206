//! NBD: the wire format ([`proto`], pure), the export server ([`server`]) and the socket side
//! of its replies ([`sink`]).

pub mod proto;
pub mod server;
pub mod sink;

#[cfg(test)]
mod tests;
