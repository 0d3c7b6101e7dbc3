//! Hypervisor.framework backend for squib (filled by the HVF backend issue).
#![deny(missing_docs)]
