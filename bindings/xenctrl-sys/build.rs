//! Build script of `xenctrl-sys`: with the `xen` feature, run bindgen over the Xen 4.17
//! tools headers (`wrapper.h`), allowlisting only what Castor calls, and link the libraries.
//! Without the feature it does nothing, so a default build needs no Xen headers.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=wrapper.h");
    #[cfg(feature = "xen")]
    generate();
}

/// The libxenctrl / libxenforeignmemory functions Castor calls.
#[cfg(feature = "xen")]
const FUNCTIONS: &[&str] = &[
    "xc_interface_open",
    "xc_interface_close",
    "xc_domain_pause",
    "xc_domain_unpause",
    "xc_domain_getinfo",
    "xc_domain_maximum_gpfn",
    "xc_logdirty_control",
    "xc__hypercall_buffer_alloc_pages",
    "xc__hypercall_buffer_free_pages",
    "xc_domain_hvm_getcontext",
    "xc_hvm_param_get",
    "xc_domain_get_tsc_info",
    "xc_domain_resume",
    "xc_domain_shutdown",
    "xenforeignmemory_open",
    "xenforeignmemory_close",
    "xenforeignmemory_map",
    "xenforeignmemory_unmap",
    "xc_version",
    "xc_get_pfn_type_batch",
    "xc_gnttab_query_size",
    "xs_open",
    "xs_close",
    "xs_read",
    "xs_directory",
    "xs_write",
    "xs_resume_domain",
];

/// The constants Castor uses (regular expressions).
#[cfg(feature = "xen")]
const CONSTANTS: &[&str] = &[
    "XEN_DOMCTL_SHADOW_OP_.*",
    "XEN_DOMCTL_PFINFO_.*",
    "HVM_PARAM_.*",
    "SHUTDOWN_.*",
    "XC_PAGE_SHIFT",
    "XENVER_version",
    "XBT_NULL",
];

#[cfg(feature = "xen")]
fn generate() {
    let mut b = bindgen::Builder::default()
        .header("wrapper.h")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .allowlist_type("xc_dominfo_t")
        .allowlist_type("xc_hypercall_buffer_t")
        .allowlist_type("xc_shadow_op_stats_t")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(false)
        .generate_comments(false);
    for f in FUNCTIONS {
        b = b.allowlist_function(f);
    }
    for c in CONSTANTS {
        b = b.allowlist_var(c);
    }
    let bindings = b.generate().unwrap_or_else(|e| {
        panic!(
            "bindgen over the Xen headers failed ({e}); install libxen-dev (Xen 4.17 tools \
             headers) and libclang-dev, or build without the `xen` feature"
        )
    });
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("xen.rs"))
        .expect("write the generated bindings");
    println!("cargo:rustc-link-lib=xenctrl");
    println!("cargo:rustc-link-lib=xenforeignmemory");
    println!("cargo:rustc-link-lib=xenguest");
    println!("cargo:rustc-link-lib=xenstore");
}
