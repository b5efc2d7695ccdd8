"""The paper's settings (docs/method.md): AutoLoRa robust fine-tuning of an ImageNet-pre-trained ResNet-18.

Dataset configs start from this one and change only what differs.
"""

import ml_collections

from autolora_jax import methods
from autolora_jax.models import IMAGENET_MEAN, IMAGENET_STD


def robust_imagenet_fe(config):
  """config.pretrained of the paper's runs: the converted robust ImageNet FE of the configured architecture,
  pretrained/<arch>_linf_eps4.0 (see README.md). A reference: --config.model.arch=resnet50 follows it."""
  return 'pretrained/' + config.model.get_ref('arch') + '_linf_eps4.0'


twins_cifar = methods.twins.cifar_settings  # TWINS's CIFAR settings: weight decay 1e-5, lambda 1.0


def get_config():
  config = ml_collections.ConfigDict()
  # 'autolora' | 'vanilla_rft' | 'pgd_at' | 'twins' | 'lora_at', or a method of your own: a name from
  # autolora_jax.methods.names() (docs/methods.md)
  config.method = 'autolora'
  # True: the authors' public code where it differs from the paper (docs/method.md, "Reference
  # compatibility"): LoRa in the last block of each stage, scalars from the training split, its scheduler
  # condition 2, eps 0.0314, KL over the configured batch, DTD/Caltech-256 validation = test, the 57-way
  # DTD head and Caltech-256's 150-per-class running index.
  config.reference_compat = False
  config.seed = 0

  # Data. The validation split is a seeded `val_fraction` of the training split.
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'cifar10'
  config.dataset.data_dir = ''  # '' = the library's default (TFDS: ~/tensorflow_datasets)
  config.dataset.download = False  # let TFDS download and prepare a missing data set
  config.dataset.train_per_class = 60  # Caltech-256: training images per class, the rest test
  config.dataset.val_fraction = 0.05
  config.dataset.split_seed = 0
  config.dataset.test_fraction = 0.0  # data sets without a test split: digits, mnist5k, folder DIR/<class>
  config.dataset.classes = ()  # a subset of the classes, relabelled in order; () = all
  # A seeded subset of the training pool: at most this many examples of each class (0 = all), taken before
  # the validation split (for short runs on large data sets, e.g. configs/fashion_mnist.py).
  config.dataset.train_per_class_limit = 0
  # 'folder' (your own images): 'imagenet' (resize 256, crop 224, the paper's high-resolution
  # preprocessing) or 'cifar' (small images as they are: pad-4 random crop and flip).
  config.dataset.preprocess = 'imagenet'

  # Model: torchvision ResNet with a LoRa branch on every block convolution and projection shortcut, or a ViT
  # with one on its dense layers (lora_targets).
  config.model = ml_collections.ConfigDict()
  # 'resnet18' | 'resnet50' | 'vit_s16' | 'vit_b16' (ViT-S/16, ViT-B/16 in timm's layout, autolora_jax/models/vit.py)
  # | 'convnext_t' | 'convnext_s' | 'convnext_b' | 'convnext_l' (models/convnext.py; stem 'convstem' too)
  # | 'swin_t' | 'swin_s' | 'swin_b' | 'swin_l' (models/swin.py); docs/vit.md
  config.model.arch = 'resnet18'
  config.model.width = 64  # ResNets: channels of the first stage
  config.model.lora_rank = 8
  config.model.lora_alpha = 1.0
  config.model.lora_placement = 'all'  # ResNets: 'all' | 'last_block'
  # ViTs: the dense layers that carry LoRa, from 'q', 'k', 'v' (slices of the fused qkv), 'proj' (attention
  # output), 'fc1', 'fc2' (MLP); ('q', 'v') is the query-and-value placement of LoRA.
  config.model.lora_targets = ('q', 'k', 'v', 'proj', 'fc1', 'fc2')
  config.model.lora_init = 'normal'  # ViTs: A ~ 'normal' N(0, 1) (as the conv branch) | 'kaiming_uniform'
  # ViTs: width, blocks and heads for experiments and tests; 0 = the architecture's own (models.VIT_SIZES).
  config.model.vit = ml_collections.ConfigDict(dict(dim=0, depth=0, heads=0))
  # ConvNeXts: the first stage's width (doubled per stage) and the blocks per stage; 0 and () = the
  # architecture's own (models.convnext.CONVNEXT_SIZES). Their LoRa targets: 'fc1', 'fc2', 'downsample' (the
  # default lora_targets above means fc1 and fc2).
  config.model.convnext = ml_collections.ConfigDict(dict(dim=0, depths=()))
  # Swins: width, heads (of the first stage, doubled per stage), blocks per stage, the attention window
  # (models.swin.SWIN_SIZES; 0 and () = the architecture's own); lora_targets as a ViT's.
  config.model.swin = ml_collections.ConfigDict(dict(dim=0, heads=0, depths=(), window=7))
  # ConvNeXts and Swins: the last block's stochastic depth rate in training (models.stochastic_depth); the
  # default 0.0 fine-tunes without it.
  config.model.drop_path = 0.0
  config.model.input_size = 224  # inputs are resized (nearest) to this inside the model
  # ResNets: 'imagenet' (7x7/2 + max-pool) | 'cifar' (3x3/1); ViTs and ConvNeXts: 'imagenet' (patches) | 'convstem'
  config.model.stem = 'imagenet'
  config.model.mean = IMAGENET_MEAN
  config.model.std = IMAGENET_STD
  config.model.conv_impl = 'auto'  # 'auto' (chosen per layer on CPU, native elsewhere) | 'native' | 'im2col'
  #   | 'explicit' | 'winograd' (see autolora_jax/ops/cpu.py)
  # ViTs and Swins: 'auto' (the written-out einsums on CPUs, jax.nn.dot_product_attention elsewhere: cuDNN's
  # fused kernel where it applies) | 'einsum' | 'xla' | 'cudnn' (see autolora_jax/models/attention.py)
  config.model.attention_impl = 'auto'
  config.model.dtype = 'float32'  # 'float32' | 'bfloat16' (the convolutions; head and loss stay float32)
  # The train step's memory: 'none' keeps the activations of the loss's forward passes (AutoLoRa: natural and
  # adversarial) for the backward pass; 'forwards' recomputes each in the backward pass, one at a time
  # (autolora_jax/remat.py): the peak holds one forward pass's activations, for one more forward of compute.
  config.model.remat = 'none'
  # The convolutions' matmul precision on GPUs and TPUs: 'default' (TPU: bfloat16 passes, A100/H100: TF32)
  # | 'high' | 'highest' (float32); no effect on CPUs (see autolora_jax/models/resnet.py, PRECISIONS).
  config.model.precision = 'default'

  # The pre-trained feature extractor: '' = random initialisation; a folder written by
  # `python -m autolora_jax.convert`, or a PyTorch .ckpt/.pt/.pth file converted on the fly. Its input
  # normalisation replaces model.mean/std (see pretrain.load_pretrained).
  config.pretrained = ''
  # Optional in-process PGD-AT pre-training of the FE before fine-tuning (the offline demo uses it).
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.epochs = 0  # 0 = none
  config.pretrain.learning_rate = 0.1
  config.pretrain.batch_size = 128
  # The FE's own seed (initialisation and data order), apart from config.seed: every fine-tuning seed and
  # method starts from the same FE.
  config.pretrain.seed = 0
  # Where the pre-trained FE is cached, in a sub-folder named by a fingerprint of everything that
  # determines it; '' = WORKDIR/pretrain. Runs that share the folder (python -m autolora_jax.compare)
  # pre-train once.
  config.pretrain.cache_dir = ''
  config.pretrain.dataset = ml_collections.ConfigDict()
  config.pretrain.dataset.name = ''
  config.pretrain.dataset.data_dir = ''
  config.pretrain.dataset.download = False
  config.pretrain.dataset.train_per_class = 60
  config.pretrain.dataset.val_fraction = 0.0
  config.pretrain.dataset.split_seed = 0
  config.pretrain.dataset.test_fraction = 0.0
  config.pretrain.dataset.classes = ()
  config.pretrain.dataset.train_per_class_limit = 0
  config.pretrain.dataset.preprocess = 'imagenet'

  # PGD in [0, 1] pixel space: random start in training, none in evaluation. norm 'linf' (sign steps,
  # clipping) or 'l2' (normalised-gradient steps, projection onto the L2 ball and the box; eps and step_size
  # are then L2 lengths: the usual budgets are eps 0.5 on CIFAR and 3.0 on ImageNet, step eps / 4).
  config.attack = ml_collections.ConfigDict()
  config.attack.norm = 'linf'
  config.attack.eps = 8 / 255
  config.attack.step_size = 2 / 255
  config.attack.train_steps = 10
  config.attack.eval_steps = 10

  # SGD with momentum and coupled weight decay; the learning rate comes from the schedule.
  config.optim = ml_collections.ConfigDict()
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4

  # Every registered method's own section, at its defaults (autolora_jax/methods/): config.auto_lr and
  # config.auto_scalars (AutoLoRa's automatic learning rate and loss scalars), config.fixed (vanilla RFT's
  # fixed l1, l2 and lr schedule; PGD-AT's schedule), config.twins (TWINS), config.lora_at (LoRa-AT), and
  # those of the methods registered before this runs (a config file that imports its own method's module).
  methods.add_config_sections(config)

  config.batch_size = 128  # global, over all devices and processes
  config.eval_batch_size = 256

  # AutoAttack on the test split, for the best and the final checkpoint, at the end of training and with
  # --mode=eval.
  config.autoattack = ml_collections.ConfigDict()
  config.autoattack.enabled = True
  # 'standard' (APGD-CE, APGD-T, FAB-T, Square) | 'plus' | 'rand' | 'fast' (APGD-CE,
  # APGD-T) | 'custom' (the attacks below); settings as the original's, autoattack.version_settings.
  config.autoattack.version = 'standard'
  config.autoattack.attacks = ()  # version 'custom': names from autoattack.ATTACKS, in order
  # 'auto' (the training attack's: Linf for attack.norm 'linf', L2 for 'l2') | 'Linf' | 'L2' | 'L1'.
  config.autoattack.norm = 'auto'
  config.autoattack.eps = 0.0  # 0: attack.eps (0.0314 under reference_compat); else this radius
  # N test points (0 = all): a seeded sample stratified by class (points 'stratified', seed autoattack.seed:
  # the same points for every method and seed of a comparison), or the first N of the split ('first').
  config.autoattack.num_points = 0
  config.autoattack.points = 'stratified'
  config.autoattack.batch_size = 250
  config.autoattack.seed = 0

  # More test evaluations at the end of a run and with --mode=eval (autolora_jax/corruptions.py).
  config.eval = ml_collections.ConfigDict()
  # Common corruptions (CIFAR-10-C / ImageNet-C): () = off; names from corruptions.CORRUPTIONS, or ('all',)
  # (--config.eval.corruptions=all, or =gaussian_noise,fog): the clean accuracy of the deployed model on the
  # corrupted test split, per corruption and severity.
  config.eval.corruptions = ()
  config.eval.severities = (1, 2, 3, 4, 5)  # of 1 (mildest) to 5
  config.eval.corruption_seed = 0  # the corrupted images' random numbers (the same images for the same seed)
  config.eval.corruption_points = 0  # N test points (a class-stratified sample, seed corruption_seed); 0 = all
  # 'auto': TFDS's published CIFAR-10-C (cifar10_corrupted) for cifar10 when it is prepared, else computed here;
  # 'generate': always computed here; 'tfds': the published images only.
  config.eval.corruption_source = 'auto'
  # AutoAttack attacks (names from autoattack.ATTACKS, e.g. ('apgd-ce',)) run on the whole validation split
  # after each epoch's validation, with config.autoattack's eps, norm, batch and seed: the robust accuracy
  # after each goes to metrics.jsonl as val_<attack> (val_apgd_ce), beside the val_pgd10 the schedule and
  # the best checkpoint follow. () = none. Recorded, not followed: it shows whether a stronger validation
  # attack would pick another best epoch.
  config.eval.val_attacks = ()

  # How the host drives the devices (none of these changes what a run computes; docs/running.md, "Feeding the devices").
  config.host = ml_collections.ConfigDict()
  config.host.metrics_every = 10  # train steps between reads of the metrics the devices sum (and at the end)
  config.host.prefetch = 2  # batches put on the devices ahead of the step, by a background thread (1-8)
  config.host.plot_every = 5  # epochs between redraws of curves.png (and at the end of the run)
  config.host.decode_threads = 0  # JPEG decoding threads; 0 = the cores this process may run on (at most 32)

  # Output.
  config.progress = True  # progress bars
  config.tensorboard = True

  # Multi-process (multi-host) runs, see autolora_jax/distributed.py and README.md. Unset values come from
  # the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or a detected cluster.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = 'auto'  # 'auto' | 'always' | 'never': call jax.distributed.initialize()
  config.distributed.coordinator_address = ''  # 'host:port' of process 0
  config.distributed.num_processes = 0  # 0 = unset
  config.distributed.process_id = -1  # -1 = unset
  config.lock()  # a misspelt key is an error, not a silently ignored new key
  return config
