"""Your own Pyro model/guide trained with AggressiveSVI on OMNIGLOT, with a report. Run as is."""
import argparse
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.optim import Adam

from pyro_lag import AggressiveSVI, evaluate, to_inference_data
from pyro_lag.data import ImageBatches, load_images, split_images
from pyro_lag.report import write_report

parser = argparse.ArgumentParser()
parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/omniglot28/omniglot28.npz"))
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--out", default="runs/wrap_your_model")
args = parser.parse_args()

encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2 * 8))
decoder = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 784))


def model(x):  # your generative model, as you would write it for pyro.infer.SVI
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(8), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x.reshape(-1, 784))


def guide(x):  # your amortized guide
    pyro.module("encoder", encoder)
    loc, log_scale = encoder(x).chunk(2, -1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


images = load_images(args.data, "train")[:6000]
train_images, valid_images = split_images(images, 1000)
train = ImageBatches(train_images, 50, seed=0)
valid = ImageBatches(valid_images, 500, binarize="fixed", shuffle=False)
svi = AggressiveSVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO(), guide_batches=train.sample,
                    clip_norm=5.0, stop_rule="patience")
history = []
for epoch in range(args.epochs):
    losses = [svi.step(*batch) for batch in train]
    figures = evaluate(model, guide, valid)
    history.append({"epoch": epoch, "train_loss": sum(losses) / train.num_examples, "aggressive": svi.aggressive,
                    "inner_steps": svi.last_inner_steps, **{k: figures[k] for k in ("elbo", "kl", "mi", "au")}})
    print(history[-1])
    svi.observe_mi(figures["mi"])

(out := Path(args.out)).mkdir(parents=True, exist_ok=True)
metrics = evaluate(model, guide, valid, iw_samples=100)
idata = to_inference_data(guide=guide, batch=next(iter(valid)), history=history, metrics=metrics)
print("report:", write_report(out / "report.html", title="My own VAE", history=history, metrics=metrics, idata=idata))
