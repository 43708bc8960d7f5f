//! `ha-kvm`: the KVM backend behind the `Domain` trait (work in progress).
