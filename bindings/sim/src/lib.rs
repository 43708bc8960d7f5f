//! `ha-sim`: a simulated guest behind the `Domain` trait (work in progress).
