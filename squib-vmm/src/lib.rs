//! The library half of `squib-vmm`: what other crates reach of the `squib` command.
//!
//! Only the API's wire format lives here, so that the fuzz targets (`fuzz/`, a crate outside the
//! workspace) drive the very request reader the binary serves with; the server, the endpoints and
//! the commands stay in the binary.

pub mod api {
    //! Firecracker's API: the part shared with the fuzz targets (the binary's `api` module holds
    //! the server and the endpoints).

    pub mod http;
}
