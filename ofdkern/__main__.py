"""`python -m ofdkern`: versions and the backend matrix of this machine."""
import platform

import torch

import ofdkern


def main() -> None:
    print(f"ofdkern {ofdkern.__version__}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
          f"python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    status = ofdkern.backend_status()
    print(f"{'backend':<10} {'built':<6} {'runs on':<10} reason")
    for name, entry in status.items():
        devices = ",".join(entry["devices"]) or "-"
        print(f"{name:<10} {str(entry['built']):<6} {devices:<10} {entry['reason'] or ''}")
    backends = list(status)
    print("\ndevices each backend runs each op on (ofdkern.backend_status(op)):")
    print(f"{'op':<26}" + "".join(f"{name:<11}" for name in backends))
    why_not = {}
    for op in ofdkern.registered_ops():
        per_backend = ofdkern.backend_status(op)
        cells = [",".join(per_backend[name]["devices"]) or "-" for name in backends]
        print(f"{op:<26}" + "".join(f"{cell:<11}" for cell in cells))
        for name in backends:
            reason = per_backend[name]["reason"]
            if reason and reason != status[name]["reason"]:
                why_not[(op, name)] = reason
    for (op, name), reason in why_not.items():
        print(f"  {op} on {name}: {reason}")
    cpu = status["cpu"]
    if cpu["built"]:
        threads = (f"{torch.get_num_threads()} threads (torch.set_num_threads)" if cpu["parallel"]
                   else "1 thread (the extension was built without OpenMP)")
        print(f"cpu kernels: {threads}")


if __name__ == "__main__":
    main()
