// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Both roles of the crate against each other: the crate's client talking to its server and
//! the irqbridge test device over a real socket (built only with both features). The VERSION
//! capabilities go through the crate's own JSON codec in both directions.

use std::path::PathBuf;
use std::time::Duration;

use irqbridge_vfio_user::client::{Client, ClientConfig};
use irqbridge_vfio_user::pci::regs::{MAGIC, REG_MAGIC};
use irqbridge_vfio_user::pci::{DeviceConfig, IrqbridgeDevice};
use irqbridge_vfio_user::proto;
use irqbridge_vfio_user::server::Server;

#[test]
fn client_and_server_negotiate_and_talk() {
    let dir = std::env::temp_dir().join(format!("irqbridge-roles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join("dev.sock");
    let mut server = Server::bind(&path).expect("bind");
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || {
        let mut device = IrqbridgeDevice::new(DeviceConfig::default()).expect("device");
        server.run(&mut device).expect("server run");
    });

    let config = ClientConfig {
        call_timeout: Duration::from_secs(5),
        max_data_xfer_size: 4096,
        ..ClientConfig::default()
    };
    let mut client = Client::connect(&path, &config).expect("connect");
    // What the server offered reached the client intact (none of it is a default).
    let caps = client.server_capabilities().clone();
    assert_eq!(caps.max_msg_fds, proto::MAX_MSG_FDS as u32);
    assert!(caps.write_multiple);
    assert_eq!(client.server_version(), (0, 0));
    assert_eq!(client.max_msg_fds(), proto::MAX_MSG_FDS);

    let info = client.device_info().unwrap();
    assert!(info.is_pci() && info.is_resettable());
    assert_eq!(info.num_irqs, proto::VFIO_PCI_NUM_IRQS);
    let mut magic = [0u8; 4];
    client
        .region_read(proto::VFIO_PCI_BAR0_REGION_INDEX, REG_MAGIC, &mut magic)
        .unwrap();
    assert_eq!(u32::from_le_bytes(magic), MAGIC);
    let msi = client.irq_info(proto::VFIO_PCI_MSI_IRQ_INDEX).unwrap();
    assert!(msi.count > 0);
    // A refused request is an error reply and the connection stays usable.
    let err = client
        .region_read(proto::VFIO_PCI_VGA_REGION_INDEX, 0, &mut magic)
        .unwrap_err();
    assert!(err.remote_errno().is_some(), "{err}");
    client
        .region_read(proto::VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut magic)
        .unwrap();
    assert!(!client.is_broken());

    drop(client);
    stop.stop().unwrap();
    thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
