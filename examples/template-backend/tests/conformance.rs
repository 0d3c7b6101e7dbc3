//! STEP 3: the whole conformance kit against the template backend.

use std::sync::Arc;

use squib_arch::{GpaRange, PageGeometry};
use squib_snapshot::DirtyTracker;
use squib_snapshot::conformance::{Harness, run_all};
use squib_template_backend::TemplateBackend;

struct TemplateHarness {
    geometry: PageGeometry,
    current: Option<Arc<TemplateBackend>>,
}

impl Harness for TemplateHarness {
    type Backend = Arc<TemplateBackend>;

    fn regions(&self) -> Vec<GpaRange> {
        vec![GpaRange::new(0x8000_0000, 16 << 20).unwrap()]
    }

    fn backend(&mut self, regions: &[GpaRange]) -> Arc<TemplateBackend> {
        let b = Arc::new(TemplateBackend::new(self.geometry, regions[0]));
        self.current = Some(Arc::clone(&b));
        b
    }

    fn guest_write(
        &mut self,
        tracker: &DirtyTracker<Arc<TemplateBackend>>,
        gpa: u64,
        len: u64,
    ) -> Result<u64, String> {
        let data = vec![0x5A; usize::try_from(len).map_err(|e| e.to_string())?];
        let backend = self.current.as_ref().ok_or("no backend yet")?;
        backend
            .guest_write(tracker, gpa, &data)
            .map_err(|e| e.to_string())
    }
}

#[test]
fn test_should_pass_the_conformance_kit_with_apple_silicon_geometry() {
    run_all(&mut TemplateHarness {
        geometry: PageGeometry::APPLE_SILICON,
        current: None,
    });
}

#[test]
fn test_should_pass_the_conformance_kit_with_x86_64_geometry() {
    run_all(&mut TemplateHarness {
        geometry: PageGeometry::X86_64,
        current: None,
    });
}
