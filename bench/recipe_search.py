"""The scratch script behind README's "How the recipe was chosen" (validation-set search).

    python bench/recipe_search.py pre BATCH LR EPOCHS TAG             # pretrain 3 x 1000 on MNIST, nu .1/.2/.3
    python bench/recipe_search.py ft TAG BATCH LR MOMENTUM DECAY MAX_EPOCHS SEED
                                                                      # fine-tune it, print per-epoch errors

Choices were made on the validation error; the test error is printed only to be recorded. Threads:
$T (default 2). Pretrained weights go to /tmp/recipe/pre_TAG.pt.
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sda.dae import DenoisingAutoencoder
from sda.data import load_mnist
from sda.finetune import EarlyStopping, finetune
from sda.noise import MaskingNoise
from sda.pretrain import encode, pretrain_layer
from sda.stacked import StackedClassifier

mode = sys.argv[1]
torch.set_num_threads(int(os.environ.get('T','2')))
d = load_mnist(); t = {k:(torch.from_numpy(v[0]), torch.from_numpy(v[1])) for k,v in d.items()}
if mode == 'pre':
    bs, lr, ep, tag = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    g = torch.Generator().manual_seed(1); x = t['train'][0]; daes=[]
    t0=time.time()
    for i,(nu) in enumerate((0.1,0.2,0.3)):
        dae = DenoisingAutoencoder(x.shape[1], 1000, g)
        losses = pretrain_layer(dae, x, MaskingNoise(nu,'fixed'), ep, lr, bs, g, name=f'l{i}')
        print(i, losses[::3], losses[-1], time.time()-t0, flush=True)
        x = encode(dae, x); daes.append(dae.state_dict())
    os.makedirs('/tmp/recipe', exist_ok=True)
    torch.save(daes, f'/tmp/recipe/pre_{tag}.pt')
else:
    tag, bs, lr, mom, decay, maxep, seed = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
    sds = torch.load(f'/tmp/recipe/pre_{tag}.pt', weights_only=True)
    daes=[]
    for sd in sds:
        dae=DenoisingAutoencoder(sd['weight'].shape[1], sd['weight'].shape[0]); dae.load_state_dict(sd); daes.append(dae)
    m = StackedClassifier.from_autoencoders(daes, 10)
    g = torch.Generator().manual_seed(seed); t0=time.time()
    tests=[]
    def cb(r):
        te = m.error_rate(*t['test']); tests.append(te)
        print(f"ep {r.epoch} lr {r.lr:.4f} trl {r.train_loss:.4f} tre {r.train_error:.4f} va {r.valid_error:.4f} te {te:.4f} t {time.time()-t0:.0f}", flush=True)
    res = finetune(m, t['train'], t['valid'], lr, bs, maxep, EarlyStopping(patience=10), g, momentum=mom, lr_decay=decay, on_epoch=cb)
    print('RESULT', sys.argv[2:], 'best', res.best_epoch, res.best_valid_error, 'test@best', tests[res.best_epoch-1], 'min', (time.time()-t0)/60)
