// The bare baseline of the microVM tier: the same QEMU command line the driver uses (same kernel,
// initramfs, image disk, config disk), started straight from the benchmark, in the foreground,
// without berthd, cgroups or the agent handshake. Its first output is the first line QEMU writes
// to the log file.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Fingerprint } from '../src/core/driver.js';
import { ensureInitramfs, ensureRootImage, findAgent, findKernel, hostTscKhz, makeWritableDisk, type Accel } from '../src/drivers/microvm/assets.js';
import { buildQemuArgs, encodeVmConfig, vmSize, type GuestRam } from '../src/drivers/microvm/driver.js';

export interface BareVm {
  dir: string;
  child: ChildProcess;
  t0: number;
}

export class BareMicroVm {
  private seq = 0;
  constructor(
    private readonly work: string,
    private readonly cacheDir: string,
    private readonly fp: Fingerprint,
    private readonly imageRootfs: string,
    private readonly imageDigest: string,
    /** Where guest RAM lives, as the driver has it for what is compared: sandbox VMs get a memfd, workloads QEMU's own. */
    private readonly ram?: GuestRam,
  ) {}

  /** Everything but the boot: disks and the command line (the same the driver builds). */
  async prepare(args: string[]): Promise<{ dir: string; argv: string[] }> {
    const kernel = findKernel();
    const agent = findAgent();
    if (!kernel || !agent) throw new Error('microVM assets missing (kernel or agent)');
    const dir = join(this.work, 'vm', `bare-m-${this.seq++}`);
    mkdirSync(dir, { recursive: true });
    const [initramfs, rootImage, tscKhz] = await Promise.all([
      ensureInitramfs(this.cacheDir, kernel, agent),
      ensureRootImage(this.cacheDir, this.imageRootfs, this.imageDigest),
      hostTscKhz(),
      makeWritableDisk(join(dir, 'rw.ext4'), 1024),
    ]);
    const id = dir.split('/').pop()!;
    writeFileSync(join(dir, 'cfg.img'), encodeVmConfig({ id, imageRootfs: this.imageRootfs, args, env: {}, cwd: '/', user: { uid: 0, gid: 0 }, resources: {} }));
    const size = vmSize({}, 1);
    const argv = buildQemuArgs({
      dir,
      accel: (this.fp.attributes.accel as Accel) ?? 'tcg',
      kernel: kernel.path,
      initramfs,
      rootImage,
      vcpus: size.vcpus,
      memoryMiB: size.memoryMiB,
      tscKhz,
      epochMs: Date.now(),
      ...(this.ram ? { ram: this.ram } : {}),
    });
    return { dir, argv };
  }

  start(qemu: string, dir: string, argv: string[]): BareVm {
    const t0 = performance.now();
    const child = spawn(qemu, argv, { stdio: 'ignore', cwd: dir });
    return { dir, child, t0 };
  }

  /** ms from spawning QEMU to the first log line (`echo ready`), then waits for the VM to power off. */
  async echo(qemu: string): Promise<number> {
    const { dir, argv } = await this.prepare(['echo', 'ready']);
    const vm = this.start(qemu, dir, argv);
    const exited = new Promise<number | null>((r) => vm.child.on('exit', (c) => r(c)));
    let done = false;
    void exited.then(() => (done = true));
    const log = join(dir, 'ctr.log');
    const deadline = vm.t0 + 60_000;
    try {
      for (;;) {
        if (existsSync(log)) {
          const text = readFileSync(log, 'utf8');
          if (text.includes('\n')) {
            const t = performance.now() - vm.t0;
            if (!/ stdout F ready$/m.test(text)) throw new Error(`bare microVM first line: ${text.split('\n')[0]}`);
            await exited;
            return t;
          }
        }
        if (done) throw new Error(`bare microVM exited without output; console: ${readFileSync(join(dir, 'console.log'), 'utf8').slice(-500)}`);
        if (performance.now() > deadline) throw new Error('bare microVM: no output within 60 s');
        await new Promise((r) => setTimeout(r, 2));
      }
    } finally {
      if (!done) vm.child.kill('SIGKILL');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /** An idle VM (`sleep 1000`): resolves once it has booted (its agent wrote the workload's first line). */
  async idle(qemu: string): Promise<BareVm> {
    const { dir, argv } = await this.prepare(['sh', '-c', 'echo up; exec sleep 1000']);
    const vm = this.start(qemu, dir, argv);
    const deadline = performance.now() + 60_000;
    while (!(existsSync(join(dir, 'ctr.log')) && readFileSync(join(dir, 'ctr.log'), 'utf8').includes('up'))) {
      if (performance.now() > deadline || vm.child.exitCode !== null) throw new Error('bare idle microVM did not boot');
      await new Promise((r) => setTimeout(r, 20));
    }
    return vm;
  }

  async kill(vm: BareVm): Promise<void> {
    if (vm.child.exitCode === null && vm.child.signalCode === null) {
      const gone = new Promise((r) => vm.child.once('exit', r));
      vm.child.kill('SIGKILL');
      await gone;
    }
    rmSync(vm.dir, { recursive: true, force: true });
  }
}
