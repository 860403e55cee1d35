"""EE + HPHN triplet on Cars196: Embedding Expansion with 2 inner points on cars196_hphn_triplet.

Seed command (clovaai/embedding-expansion README, "EE + HPHN-triplet (n_inner_points=2)")::

  python3 main.py --gpu_idx=0 --data_name=cars196 \
    --backbone=googlenet --embed_dim=512 \
    --loss=hphn_triplet --n_inner_pts=2 --ee_l2norm=True \
    --seed=0 --batch_size=128 --image_size=227 \
    --optim=adam --lr=0.0001 --lr_decay_factor=0.5 --lr_decay_epochs=400,800,1200,1600 \
    --epochs=4000 --eval_epoch_term=5 --save_dir=results/inner-2

Batches hold same-class pairs at (2i, 2i+1) (32 instances per class); each pair adds two
l2-normalized inner points. Transforms as cars196_hphn_triplet (the official
Random2DTranslation + flip, test squash resize to 227, OpenCV bilinear). Every inner point
occurs twice (k and n+1−k of the pair's two rows), so a synthetic hardest negative is always
tied; as in MXNet each copy gets the full gradient (loss.tie_gradient 'each').
Published (README): best Recall@1 74.5 (71.6 in the paper).
"""

from configs import cars196_hphn_triplet


def get_config():
    config = cars196_hphn_triplet.get_config()
    config.name = "cars196_ee_hphn_triplet"
    config.regularizer.name = "ee"
    config.regularizer.ee_num_inner = 2
    config.regularizer.ee_l2_norm = True
    config.loss.tie_gradient = "each"  # the official rule for the twin synthetic points
    return config
