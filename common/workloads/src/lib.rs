//! `ha-workloads`: the built-in workload guests, written down once.
//!
//! The KVM and simulated backends run these guests; the tests and the drill check them.
//! Nothing here runs a guest or touches a hypervisor: it is the contract (memory layout,
//! parameters, status page, output ring) and the reference semantics every backend is
//! held to.
//!
//! | module | what |
//! |---|---|
//! | [`db`] | the `db` workload's reference semantics (layout, record check, log records) |
//! | [`files`] | the `files` workload's reference semantics (layout, content, the document tree, the file table) |
//! | [`guest_abi`] | the memory layout shared by the built-in guests and their VMMs |
//! | [`model`] | the workloads' one reference model: a unit of work over any guest memory |
//! | [`web`] | the `web` workload's reference semantics (layout, document root, a request) |

pub mod db;
pub mod files;
pub mod guest_abi;
pub mod model;
pub mod web;
