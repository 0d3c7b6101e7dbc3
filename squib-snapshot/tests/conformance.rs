//! The conformance suite against the recording stand-in, in both mechanisms and geometries.
mod common;

use common::RecorderHarness;
use squib_arch::PageGeometry;
use squib_snapshot::conformance::run_all;

#[test]
fn test_should_pass_conformance_on_the_faulting_recorder_apple_silicon() {
    run_all(&mut RecorderHarness::new(PageGeometry::APPLE_SILICON, false));
}

#[test]
fn test_should_pass_conformance_on_the_faulting_recorder_x86_64() {
    run_all(&mut RecorderHarness::new(PageGeometry::X86_64, false));
}

#[test]
fn test_should_pass_conformance_on_the_kernel_logged_recorder() {
    run_all(&mut RecorderHarness::new(PageGeometry::X86_64, true));
}
