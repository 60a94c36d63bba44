//! Volumes: an ext4 image of the reserved size on a loop device, mounted under the node's data
//! directory and bind-mounted into the containers that name it. The image file is sparse, so an
//! empty volume costs the host nothing until it is written.

use super::{is_mounted, run, Ctx, Kind, Output, WorkloadId};
use std::path::{Path, PathBuf};
use tfgrid_core::deployment::{ResultState, WorkloadData};

pub struct Volume {
    dir: PathBuf,
}

impl Volume {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn image(&self, id: &WorkloadId) -> PathBuf {
        self.dir.join(format!("{}.img", id.key()))
    }

    /// Where the volume is mounted on the host; containers bind-mount it from here.
    pub fn path(&self, id: &WorkloadId) -> PathBuf {
        self.dir.join(id.key())
    }

    async fn mount(&self, img: &Path, at: &Path) -> Result<(), String> {
        std::fs::create_dir_all(at).map_err(|e| format!("creating {}: {e}", at.display()))?;
        if !is_mounted(at) {
            run(
                "mount",
                &["-o", "loop", &img.to_string_lossy(), &at.to_string_lossy()],
            )
            .await?;
        }
        Ok(())
    }

    async fn make(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        let WorkloadData::Volume(spec) = &ctx.workload.data else {
            return Err("not a volume workload".into());
        };
        // ext4 needs room for its own metadata; below this mkfs fails with a less clear message.
        if spec.size < 1 << 20 {
            return Err(format!(
                "volume size {} is too small: at least 1 MiB",
                spec.size
            ));
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        // The image is sparse, but its owner was sold all of it: it must be able to fill it.
        crate::capacity::check_room(&self.dir, spec.size, &format!("volume {}", ctx.id.key()))?;
        let img = self.image(&ctx.id);
        let f =
            std::fs::File::create(&img).map_err(|e| format!("creating {}: {e}", img.display()))?;
        f.set_len(spec.size)
            .map_err(|e| format!("sizing {}: {e}", img.display()))?;
        drop(f);
        let at = self.path(&ctx.id);
        let made = async {
            run("mkfs.ext4", &["-q", "-F", &img.to_string_lossy()]).await?;
            self.mount(&img, &at).await
        }
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&img);
            let _ = std::fs::remove_dir(&at);
            return Err(e);
        }
        Ok([("size".to_string(), spec.size.to_string())].into())
    }
}

impl Kind for Volume {
    async fn provision(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        self.make(ctx).await
    }

    async fn deprovision(&self, id: &WorkloadId) -> Result<(), String> {
        let at = self.path(id);
        if is_mounted(&at) {
            // The loop device was set up by mount -o loop with autoclear: unmounting frees it.
            nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| format!("unmounting {}: {e}", at.display()))?;
        }
        for r in [
            std::fs::remove_dir(&at),
            std::fs::remove_file(self.image(id)),
        ] {
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing volume {}: {e}", id.key())),
            }
        }
        Ok(())
    }

    async fn inspect(&self, id: &WorkloadId) -> (ResultState, String) {
        if is_mounted(&self.path(id)) {
            (ResultState::Ok, String::new())
        } else {
            (ResultState::Error, "volume is not mounted".into())
        }
    }

    async fn recover(&self, ctx: &Ctx<'_>) -> Result<Output, String> {
        let img = self.image(&ctx.id);
        if !img.exists() {
            return Err(format!(
                "volume image {} is gone; its data cannot be recovered",
                img.display()
            ));
        }
        self.mount(&img, &self.path(&ctx.id)).await?;
        let size = std::fs::metadata(&img).map(|m| m.len()).unwrap_or(0);
        Ok([("size".to_string(), size.to_string())].into())
    }
}
