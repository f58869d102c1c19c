// The same driver conformance suite against the microVM driver: real QEMU microvm machines booting
// Debian's cloud kernel into the Berth guest agent, real host cgroups.
import { conformanceOnHost } from '../conformance/host.js';
import { findAgent, findKernel } from './assets.js';
import { MicroVmDriver, QEMU } from './driver.js';

conformanceOnHost(
  'microvm',
  [QEMU, findKernel()?.path ?? '/boot/vmlinuz-*-cloud-amd64 (linux-image-cloud-amd64)', findAgent() ?? '/usr/local/lib/berth/berth-agent'],
  'cache-unused',
  (stateDir, cgroupParent) => new MicroVmDriver({ stateDir, cgroupParent }),
);
