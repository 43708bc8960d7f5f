//! `ha-bench`: Castor's benchmarks.
fn main() {}
