//! NBD: the wire format ([`proto`], pure) and the export server ([`server`]).

pub mod proto;
pub mod server;

#[cfg(test)]
mod tests;
