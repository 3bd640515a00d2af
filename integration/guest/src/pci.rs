// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The irqbridge device as Linux sees it: sysfs, config space, driver binding, BAR0 mappings.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bail;
use crate::regs::Regs;
use crate::report::{Context, Error, Result};
use crate::sys::Mapping;

/// PCI vendor ID of the irqbridge test device.
pub const VENDOR: u16 = 0x6972;
/// PCI device ID of the irqbridge test device.
pub const DEVICE: u16 = 0x7162;

/// COMMAND bit 10: INTx disable.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Config space: capabilities pointer.
pub const CFG_CAP_PTR: usize = 0x34;
/// Config space: capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// One PCI function under /sys/bus/pci/devices.
#[derive(Debug, Clone)]
pub struct PciDev {
    /// Domain:bus:device.function, e.g. `0000:00:03.0`.
    pub bdf: String,
    /// Its sysfs directory.
    pub path: PathBuf,
}

fn read_trimmed(p: &Path) -> Result<String> {
    Ok(fs::read_to_string(p)
        .ctx(format_args!("reading {}", p.display()))?
        .trim()
        .to_string())
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn write_sysfs(p: &Path, value: &str) -> Result<()> {
    fs::write(p, value).ctx(format_args!("writing {value:?} to {}", p.display()))
}

/// Finds the irqbridge device (vendor 0x6972, device 0x7162).
pub fn find_device() -> Result<PciDev> {
    find_by_ids(VENDOR, DEVICE)?.ok_or_else(|| {
        Error::msg(format!(
            "no PCI device {VENDOR:04x}:{DEVICE:04x} in /sys/bus/pci/devices (is the vfio-user-pci device attached?)"
        ))
    })
}

/// The first PCI function (in BDF order) with the given vendor and device IDs, if any.
pub fn find_by_ids(vendor_id: u16, device_id: u16) -> Result<Option<PciDev>> {
    let dir = Path::new("/sys/bus/pci/devices");
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).ctx("listing /sys/bus/pci/devices")? {
        let entry = entry.ctx("listing /sys/bus/pci/devices")?;
        let path = entry.path();
        let vendor = read_trimmed(&path.join("vendor"))
            .ok()
            .and_then(|s| parse_hex(&s));
        let device = read_trimmed(&path.join("device"))
            .ok()
            .and_then(|s| parse_hex(&s));
        if vendor == Some(u64::from(vendor_id)) && device == Some(u64::from(device_id)) {
            found.push(PciDev {
                bdf: entry.file_name().to_string_lossy().into_owned(),
                path,
            });
        }
    }
    found.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(found.into_iter().next())
}

/// Walks the capability list of a config-space image; returns the offset of capability `id`.
pub fn find_capability(config: &[u8], id: u8) -> Option<usize> {
    let status = u16::from_le_bytes([*config.get(6)?, *config.get(7)?]);
    if status & 0x10 == 0 {
        return None;
    }
    let mut ptr = usize::from(*config.get(CFG_CAP_PTR)? & 0xfc);
    // At most 48 capabilities fit in 256 bytes: a longer walk is a loop.
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        if *config.get(ptr)? == id {
            return Some(ptr);
        }
        ptr = usize::from(*config.get(ptr + 1)? & 0xfc);
    }
    None
}

/// Little-endian u16 at `off` of a config image.
pub fn cfg16(config: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes([
        *config.get(off)?,
        *config.get(off + 1)?,
    ]))
}

/// Little-endian u32 at `off` of a config image.
pub fn cfg32(config: &[u8], off: usize) -> Option<u32> {
    let b = config.get(off..off + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Where the MSI-X table and PBA are, from the capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixInfo {
    /// Capability offset in config space.
    pub cap: usize,
    /// Table size (number of vectors).
    pub vectors: u32,
    /// BAR index of the table.
    pub table_bir: u8,
    /// Offset of the table in its BAR.
    pub table_offset: u32,
    /// BAR index of the PBA.
    pub pba_bir: u8,
    /// Offset of the PBA in its BAR.
    pub pba_offset: u32,
}

/// Parses the MSI-X capability of a config-space image.
pub fn msix_info(config: &[u8]) -> Option<MsixInfo> {
    let cap = find_capability(config, CAP_ID_MSIX)?;
    let ctrl = cfg16(config, cap + 2)?;
    let table = cfg32(config, cap + 4)?;
    let pba = cfg32(config, cap + 8)?;
    Some(MsixInfo {
        cap,
        vectors: u32::from(ctrl & 0x7ff) + 1,
        table_bir: (table & 7) as u8,
        table_offset: table & !7,
        pba_bir: (pba & 7) as u8,
        pba_offset: pba & !7,
    })
}

impl PciDev {
    /// The whole config space that sysfs exposes (256 bytes, or 4 KiB for PCIe).
    pub fn config(&self) -> Result<Vec<u8>> {
        fs::read(self.path.join("config"))
            .ctx(format_args!("reading {}/config", self.path.display()))
    }

    /// Clears COMMAND bit 10 (INTx disable) with a read-modify-write of the COMMAND word through
    /// sysfs `config`, as a uio_pci_generic user re-enables the interrupt.
    pub fn clear_intx_disable(&self) -> Result<u16> {
        use std::os::unix::fs::FileExt;
        let path = self.path.join("config");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx(format_args!("opening {}", path.display()))?;
        let mut w = [0u8; 2];
        f.read_exact_at(&mut w, 4).ctx("reading COMMAND")?;
        let cmd = u16::from_le_bytes(w) & !CMD_INTX_DISABLE;
        f.write_all_at(&cmd.to_le_bytes(), 4)
            .ctx("writing COMMAND")?;
        Ok(cmd)
    }

    /// `(start, end, flags)` of each resource line in sysfs `resource` (BARs 0-5, then ROM...).
    pub fn resources(&self) -> Result<Vec<(u64, u64, u64)>> {
        let text = read_trimmed(&self.path.join("resource"))?;
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<u64> = line.split_whitespace().filter_map(parse_hex).collect();
            match f.as_slice() {
                [s, e, fl] => out.push((*s, *e, *fl)),
                _ => bail!("malformed sysfs resource line {line:?}"),
            }
        }
        Ok(out)
    }

    /// Size of BAR `i` from sysfs `resource` (0 when absent).
    pub fn bar_size(&self, i: usize) -> Result<u64> {
        let res = self.resources()?;
        let Some(&(start, end, _)) = res.get(i) else {
            bail!("sysfs resource has no line for BAR{i}");
        };
        Ok(if end > start { end - start + 1 } else { 0 })
    }

    /// The Linux IRQ number of the device's INTx (or MSI base) as sysfs `irq` reports it.
    pub fn irq(&self) -> Result<u32> {
        read_trimmed(&self.path.join("irq"))?
            .parse()
            .map_err(|_| Error::msg("sysfs irq is not a number"))
    }

    /// The name of the bound driver, if any.
    pub fn driver(&self) -> Option<String> {
        fs::read_link(self.path.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// The IOMMU group number.
    pub fn iommu_group(&self) -> Result<u32> {
        let link = fs::read_link(self.path.join("iommu_group")).map_err(|e| {
            Error::msg(format!(
                "device {} has no IOMMU group ({e}): the guest needs intel_iommu=on and QEMU an intel-iommu device",
                self.bdf
            ))
        })?;
        link.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::msg(format!("odd iommu_group link {}", link.display())))
    }

    /// Binds `driver` (e.g. `vfio-pci`, `uio_pci_generic`) with driver_override, unbinding any
    /// other driver first. The driver module must be loaded.
    pub fn bind(&self, driver: &str) -> Result<()> {
        if self.driver().as_deref() == Some(driver) {
            return Ok(());
        }
        if !Path::new("/sys/bus/pci/drivers").join(driver).exists() {
            bail!("driver {driver} is not loaded (no /sys/bus/pci/drivers/{driver})");
        }
        write_sysfs(&self.path.join("driver_override"), driver)?;
        if self.driver().is_some() {
            write_sysfs(&self.path.join("driver/unbind"), &self.bdf)?;
        }
        write_sysfs(Path::new("/sys/bus/pci/drivers_probe"), &self.bdf)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.driver() {
                Some(d) if d == driver => return Ok(()),
                _ if Instant::now() >= deadline => {
                    bail!(
                        "{driver} did not bind to {} (bound: {:?})",
                        self.bdf,
                        self.driver()
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Unbinds whatever driver is bound and clears driver_override.
    pub fn unbind(&self) -> Result<()> {
        if self.driver().is_some() {
            write_sysfs(&self.path.join("driver/unbind"), &self.bdf)?;
        }
        write_sysfs(&self.path.join("driver_override"), "\n")
    }

    /// Whether memory decoding etc. is enabled (sysfs `enable`).
    pub fn enabled(&self) -> Result<bool> {
        Ok(read_trimmed(&self.path.join("enable"))? != "0")
    }

    /// Enables or disables the device through sysfs `enable`.
    pub fn set_enabled(&self, on: bool) -> Result<()> {
        write_sysfs(&self.path.join("enable"), if on { "1" } else { "0" })
    }

    /// Maps BAR `i` through sysfs `resource<i>` (the device must have memory decoding enabled).
    pub fn map_bar(&self, i: usize) -> Result<MmioBar> {
        let size = self.bar_size(i)?;
        if size == 0 {
            bail!("BAR{i} is absent");
        }
        let path = self.path.join(format!("resource{i}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx(format_args!("opening {}", path.display()))?;
        let len = usize::try_from(size).map_err(|_| Error::msg("BAR too large"))?;
        let map =
            Mapping::new(file.as_fd(), 0, len).ctx(format_args!("mmap of {}", path.display()))?;
        Ok(MmioBar { map, _file: file })
    }
}

/// A BAR mapped through sysfs: each register access is one guest MMIO access.
#[derive(Debug)]
pub struct MmioBar {
    map: Mapping,
    _file: File,
}

impl Regs for MmioBar {
    fn read32(&self, off: u64) -> Result<u32> {
        let off = usize::try_from(off).map_err(|_| Error::msg("offset too large"))?;
        self.map.read32(off).ctx("BAR read")
    }

    fn write32(&self, off: u64, val: u32) -> Result<()> {
        let off = usize::try_from(off).map_err(|_| Error::msg("offset too large"))?;
        self.map.write32(off, val).ctx("BAR write")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[6] = 0x10; // status: capability list
        c[CFG_CAP_PTR] = 0x40;
        c[0x40] = CAP_ID_MSIX;
        c[0x41] = 0;
        c[0x42..0x44].copy_from_slice(&7u16.to_le_bytes());
        c[0x44..0x48].copy_from_slice(&2u32.to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&(0x1000u32 | 2).to_le_bytes());
        c
    }

    #[test]
    fn msix_capability_is_parsed() {
        let info = msix_info(&image()).expect("MSI-X capability");
        assert_eq!(
            info,
            MsixInfo {
                cap: 0x40,
                vectors: 8,
                table_bir: 2,
                table_offset: 0,
                pba_bir: 2,
                pba_offset: 0x1000
            }
        );
    }

    #[test]
    fn capability_walk_stops_on_loops_and_missing_list() {
        let mut c = image();
        c[0x40] = 0x05;
        c[0x41] = 0x40; // points at itself
        assert_eq!(find_capability(&c, CAP_ID_MSIX), None);
        let mut c = image();
        c[6] = 0;
        assert_eq!(find_capability(&c, CAP_ID_MSIX), None);
        let mut c = image();
        c[0x41] = 0xfc; // next beyond a short image
        c[0x40] = 0x09;
        assert_eq!(find_capability(&c[..0x80], CAP_ID_MSIX), None);
    }
}
